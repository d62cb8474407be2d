"""CUDA paths: bitsandbytes' GPU kernels, GPTQ and RTN on the GPU. Skipped without CUDA
(conftest marks them); run them on a GPU machine with `pytest -m gpu`."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantcli
from quantcli.config.quantize import EvalConfig, QuantizeConfig
from tests.conftest import logits

pytestmark = pytest.mark.gpu
EVAL = EvalConfig(max_tokens=2048)


@pytest.mark.parametrize("method,bits", [("bnb-int8", 8), ("bnb-nf4", 4), ("bnb-fp4", 4)])
def test_bitsandbytes_cuda_kernels_quantize_every_layer_and_reload(tmp_path, prompt_ids, method, bits):
    report = quantcli.quantize(
        QuantizeConfig(bits=bits, method=method, device="cuda", output=tmp_path / "q", eval=EVAL)
    )
    assert report.device == "cuda" and not report.fallbacks  # no CPU kernel limits on the GPU
    assert report.perplexity_delta["percent"] < (1.0 if bits == 8 else 40)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cuda").eval()
    assert torch.equal(logits(plain, prompt_ids), logits(quantcli.load(tmp_path / "q", device="cuda")[0], prompt_ids))


def test_default_method_on_cuda_is_bitsandbytes(tmp_path):
    assert (
        quantcli.quantize(QuantizeConfig(bits=4, device="cuda", output=tmp_path / "q", eval=None)).method == "bnb-nf4"
    )


@pytest.mark.parametrize("method, rel_tol", [("rtn", 5e-3), ("gptq", 2e-2)])
def test_integer_methods_on_cuda_match_cpu(tmp_path, method, rel_tol):
    """RTN: the same integers up to rare rounding ties. GPTQ: its rounding decisions cascade, so
    CUDA's float order gives another model of the same quality (the spread over calibration seeds
    in benchmarks/methods.py is about 0.3% of perplexity; RTN INT4's is about 8% above GPTQ's)."""
    runs = {
        device: quantcli.quantize(
            QuantizeConfig(bits=4, method=method, device=device, dtype="float32", output=tmp_path / device, eval=EVAL)
        )
        for device in ("cpu", "cuda")
    }
    assert math.isclose(
        runs["cpu"].perplexity_after.perplexity, runs["cuda"].perplexity_after.perplexity, rel_tol=rel_tol
    )
    if method == "gptq":
        assert runs["cuda"].stats["peak_cuda_bytes"] > 0
