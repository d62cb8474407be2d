"""The held-out protocol of the quantizer comparisons (issue 26): every row of every table that compares
quantcli with llama.cpp (+ imatrix) and AutoRound is calibrated and scored here, the same way.

- Model: SmolLM2-135M-Instruct (``make smollm2``; its weights are dequantized Q4_1).
- Calibration: WikiText-2 validation articles 31-60 (``wiki.valid.calib.txt``), 64 windows of 256 tokens
  (16,384 tokens, half quantcli's default: the 2-core machines could not afford every row otherwise);
  llama.cpp's imatrix and AutoRound get the same tokens.
- Evaluation: the first 16,384 tokens of ``benchmarks/data/tiny-shakespeare/heldout.txt`` (another domain,
  never calibrated on) in non-overlapping windows of 512, base = SmolLM2 fp32.
- A transformers-loadable checkpoint is scored by ``quantcli.evaluate`` (perplexity, KL to the fp32 base,
  top-1 agreement); a GGUF file by llama.cpp itself on quantcli's token ids and windows
  (:func:`score_gguf`), its KL against the fp32 model's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.setups import HELDOUT
from tests.support.models import WIKITEXT, smollm2_folder

SEQ_LEN = 512
MAX_TOKENS = 16384
CALIBRATION = {"dataset": str(WIKITEXT / "wiki.valid.calib.txt"), "samples": 64, "seq_len": 256}
SETTINGS = {
    "model": "SmolLM2-135M-Instruct (weights dequantized from its Q4_1 GGUF)",
    "eval": {"dataset": "benchmarks/data/tiny-shakespeare/heldout.txt", "tokens": MAX_TOKENS, "seq_len": SEQ_LEN},
    "calibration": {**CALIBRATION, "dataset": "benchmarks/data/wikitext-2/wiki.valid.calib.txt"},
    "base": "SmolLM2 fp32 (transformers)",
}


def calibration_config() -> Any:
    """quantcli's calibration settings for every quantcli row (seed 0)."""
    from quantcli.config.quantize import CalibrationConfig

    return CalibrationConfig(
        dataset=CALIBRATION["dataset"], samples=CALIBRATION["samples"], seq_len=CALIBRATION["seq_len"]
    )


def calibration_windows(tokenizer: Any) -> Any:
    """The ``[64, 256]`` token windows quantcli calibrates on, for the peers to get the very same tokens
    (decode each window for a text-only tool such as ``llama-imatrix``)."""
    from quantcli.sources.datasets import calibration_batch, read_documents

    config = calibration_config()
    return calibration_batch(read_documents(config.dataset), tokenizer, config.samples, config.seq_len, config.seed)


def eval_config() -> Any:
    from quantcli.config.quantize import EvalConfig

    return EvalConfig(dataset=str(HELDOUT), seq_len=SEQ_LEN, max_tokens=MAX_TOKENS)


def score_checkpoint(path: str | Path, base: str | Path | None = None) -> dict[str, float]:
    """Perplexity, KL to the base and top-1 agreement of a checkpoint transformers (or quantcli) loads."""
    import quantcli

    base = str(base or smollm2_folder())
    result = quantcli.evaluate(str(path), eval_config(), base=None if str(path) == base else base)
    return {key: result[key] for key in ("perplexity", "kl_divergence", "top1_agreement") if key in result}


def heldout_ids(tokenizer: Any) -> list[int]:
    """The token ids quantcli scores (the stream protocol: the file's text tokenized once)."""
    return list(tokenizer(HELDOUT.read_bytes().decode("utf-8"))["input_ids"][:MAX_TOKENS])


def base_logits() -> Any:
    """The fp32 SmolLM2 scorer, one window at a time (for the KL of GGUF rows)."""
    from transformers import AutoModelForCausalLM

    from tests.support.gguf_harness import hf_logits

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype="float32").eval()
    return hf_logits(model)


def score_gguf(gguf_file: str | Path, ids: list[int], base: Any = None, threads: int = 2) -> dict[str, float]:
    """llama.cpp's perplexity of a GGUF file on ``ids`` in quantcli's windows; with ``base`` (a scorer from
    :func:`base_logits`) also the mean KL(base || file) per scored token and top-1 agreement."""
    import torch

    from quantcli.measure.perplexity import windows
    from tests.support.gguf_harness import llamacpp_logits

    model = llamacpp_logits(gguf_file, SEQ_LEN, threads=threads)
    nlls, kls, agree = [], [], []
    for w in windows(len(ids), SEQ_LEN, SEQ_LEN):
        fed = ids[w.begin : w.end]
        rows = slice(len(fed) - w.scored - 1, len(fed) - 1)
        log_q = torch.log_softmax(torch.from_numpy(model(fed))[rows].float(), dim=-1)
        targets = torch.tensor(fed[len(fed) - w.scored :])
        nlls.append(-log_q.gather(-1, targets[:, None])[:, 0])
        if base is not None:
            log_p = torch.log_softmax(torch.from_numpy(base(fed))[rows].float(), dim=-1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
            agree.append(log_p.argmax(-1) == log_q.argmax(-1))
    result = {"perplexity": float(np.exp(torch.cat(nlls).double().mean().item()))}
    if base is not None:
        result["kl_divergence"] = float(torch.cat(kls).double().mean())
        result["top1_agreement"] = float(torch.cat(agree).double().mean())
    return result
