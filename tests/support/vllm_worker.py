"""Runs inside vLLM's own venv (``make vllm``: ``.vllm/bin/python``), never in quantcli's: one engine
for one checkpoint, driven by a JSON request, answering with JSON. tests/support/vllm_harness.py writes
the request and reads the answer; this file imports nothing from quantcli.

    .vllm/bin/python tests/support/vllm_worker.py REQUEST.json ANSWER.json

Request keys: ``model`` (folder), ``dtype``, ``max_model_len``, and any of ``windows`` (lists of token
ids: the log-probability vLLM gives each token after the first, from ``prompt_logprobs``), ``prompts``
with ``max_new_tokens`` (greedy continuations, token ids) and ``bench`` (``prompt`` ids,
``new_tokens``, ``repeats``: prefill and decode tokens/s of one sequence). An engine that cannot be built answers
``{"error": "Type: message"}`` with exit status 3.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _engine(request: dict):
    from vllm import LLM

    return LLM(
        model=request["model"],
        dtype=request.get("dtype", "bfloat16"),
        max_model_len=request.get("max_model_len", 1024),
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        max_num_seqs=request.get("max_num_seqs", 8),
    )


def _scores(llm, windows: list[list[int]]) -> list[list[float]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in windows], params, use_tqdm=False)
    scores = []
    for ids, output in zip(windows, outputs):
        entries = output.prompt_logprobs[1:]  # the first token has no prediction
        scores.append([entry[token].logprob for token, entry in zip(ids[1:], entries)])
    return scores


def _greedy(llm, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def _bench(llm, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Best-of-``repeats`` prefill of ``prompt`` and greedy decode of ``new_tokens`` (EOS ignored) for one sequence."""
    from vllm import SamplingParams, TokensPrompt

    request = TokensPrompt(prompt_token_ids=prompt)
    decode = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prefill = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([request], decode, use_tqdm=False)  # warm-up
    prefill_s, total_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([request], prefill, use_tqdm=False)
        prefill_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        llm.generate([request], decode, use_tqdm=False)
        total_s.append(time.perf_counter() - start)
    prefill_best, total_best = min(prefill_s), min(total_s)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": len(prompt) / prefill_best,
        "decode_tokens_per_s": (new_tokens - 1) / max(total_best - prefill_best, 1e-9),
    }


def main(request_path: str, answer_path: str) -> int:
    request = json.loads(open(request_path, encoding="utf-8").read())
    import torch
    import vllm

    answer: dict = {"versions": {"vllm": vllm.__version__, "torch": torch.__version__}}
    start = time.perf_counter()
    try:
        llm = _engine(request)
    except Exception as error:
        answer["error"] = f"{type(error).__name__}: {error}"
        open(answer_path, "w", encoding="utf-8").write(json.dumps(answer))
        return 3
    answer["load_seconds"] = time.perf_counter() - start
    if request.get("windows"):
        answer["logprobs"] = _scores(llm, request["windows"])
    if request.get("prompts"):
        answer["greedy"] = _greedy(llm, request["prompts"], request.get("max_new_tokens", 16))
    if request.get("bench"):
        answer["bench"] = _bench(llm, **request["bench"])
    open(answer_path, "w", encoding="utf-8").write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main(sys.argv[1], sys.argv[2]))
