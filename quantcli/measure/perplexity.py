"""Sliding-window perplexity (transformers' "perplexity of fixed-length models"), with the settings
that produced it, a 95% interval, and optional KL divergence / top-1 agreement against a base model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import DatasetError, InputError, option

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are fed; the last ``scored`` of them are predicted and scored."""

    begin: int
    end: int
    scored: int


def check_context(model: Any, seq_len: int, name: str = "eval.seq_len") -> None:
    """Refuse windows (of the option ``name``) longer than the model's context (``max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise InputError(
            f"{option(name, seq_len)} is beyond the model's context of {limit} tokens (max_position_embeddings). Use "
            f"{option(name, limit)} or less."
        )


def windows(total: int, seq_len: int, stride: int) -> list[Window]:
    """Windows of the transformers sliding-window loop: each token is scored once, with up to
    ``seq_len - stride`` tokens of context carried over from the previous window."""
    result: list[Window] = []
    previous_end = 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        scored = end - previous_end if begin else end - begin - 1  # the first token has no prediction
        if end - begin >= 2 and scored > 0:
            result.append(Window(begin, end, min(scored, end - begin - 1)))
        previous_end = end
        if end == total:
            break
    return result


@dataclass
class EvalResult:
    """Perplexity and speed of one model on one token stream; ``settings`` says how it was measured."""

    perplexity: float
    nll: float
    ci95: tuple[float, float]
    tokens_scored: int
    windows: int
    seconds: float
    tokens_per_second: float
    settings: dict[str, Any]
    kl_divergence: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(plan: list[tuple[int, Window]], batch_size: int) -> Iterator[list[tuple[int, Window]]]:
    """Windows grouped longest first, at most ``batch_size`` at a time (so padding stays small)."""
    ordered = sorted(plan, key=lambda item: item[1].begin - item[1].end)
    for index in range(0, len(ordered), batch_size):
        yield ordered[index : index + batch_size]


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def evaluate_sequences(
    model: Any,
    sequences: list[torch.Tensor],
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    base_model: Any = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score every token of each 1-D sequence once (sliding windows within a sequence, never across).

    Windows of different lengths share a batch right-padded with an attention mask, which leaves a
    causal model's logits at the real positions unchanged. With ``base_model``, also the mean
    KL(base || model) and how often both pick the same top-1 token, on the same positions.
    """
    import torch

    total = sum(int(s.numel()) for s in sequences)
    plan = [
        (index, window)
        for index, sequence in enumerate(sequences)
        for window in windows(int(sequence.numel()), seq_len, stride)
    ]
    if not plan:
        raise DatasetError(
            f"the evaluation text has {total} token(s) in {len(sequences)} sequence(s); perplexity needs at least 2 in "
            "one."
        )
    device = next(model.parameters()).device
    nlls: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    agree: list[torch.Tensor] = []
    seconds = 0.0
    fed = 0
    with torch.inference_mode():
        for batch in _batches(plan, batch_size):
            width = max(w.end - w.begin for _, w in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (index, w) in enumerate(batch):
                input_ids[row, : w.end - w.begin] = sequences[index][w.begin : w.end]
                mask[row, : w.end - w.begin] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            start = time.perf_counter()
            logits = _logits(model, input_ids, mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            fed += int(mask.sum())
            base_logits = None
            if base_model is not None:
                base_device = next(base_model.parameters()).device
                base_logits = _logits(base_model, input_ids.to(base_device), mask.to(base_device)).to(device)
            for row, (_, w) in enumerate(batch):
                length = w.end - w.begin
                predicting = slice(length - w.scored - 1, length - 1)
                log_q = torch.log_softmax(logits[row, predicting], dim=-1)
                targets = input_ids[row, length - w.scored : length]
                nlls.append(-log_q.gather(-1, targets[:, None])[:, 0].cpu())
                if base_logits is not None:
                    log_p = torch.log_softmax(base_logits[row, predicting], dim=-1)
                    kls.append((log_p.exp() * (log_p - log_q)).sum(-1).cpu())
                    agree.append((log_p.argmax(-1) == log_q.argmax(-1)).float().cpu())
            if progress:
                progress(sum(w.scored for _, w in batch))
    per_token = torch.cat(nlls).double()
    mean = per_token.mean().item()
    half_width = 1.96 * per_token.std().item() / math.sqrt(per_token.numel()) if per_token.numel() > 1 else 0.0
    record = dict(settings or {})
    record.update(seq_len=seq_len, stride=stride, tokens=total, sequences=len(sequences), batch_size=batch_size)
    return EvalResult(
        perplexity=math.exp(mean),
        nll=mean,
        ci95=(math.exp(mean - half_width), math.exp(mean + half_width)),
        tokens_scored=int(per_token.numel()),
        windows=len(plan),
        seconds=seconds,
        tokens_per_second=fed / seconds if seconds else float("inf"),
        settings=record,
        kl_divergence=torch.cat(kls).double().mean().item() if kls else None,
        top1_agreement=torch.cat(agree).double().mean().item() if agree else None,
    )
