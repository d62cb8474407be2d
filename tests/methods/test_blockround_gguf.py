"""blockround on GGUF grids (``--format gguf``): codes tuned on llama.cpp's own scales, so the file keeps the
type's structure; llama.cpp loads it and computes what quantcli's dequantized model of the same file computes,
and the tuning lowers the block output error GPTQ started from. Skips unless `make llama-cpp` has built
llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest

import quantcli
from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
from quantcli.formats.gguf.types import block_type
from quantcli.formats.gguf.writer import gguf_file
from tests.formats.test_gguf_llamacpp import F32_CACHE, SEQ_LEN, ids, wide_llama  # noqa: F401 (fixtures)
from tests.support.gguf_harness import hf_logits, llama_cpp_module, llamacpp_logits


@pytest.mark.parametrize("name, model, iterations", [("Q4_0", None, 8), ("Q4_K_M", "wide", 32)])
def test_llamacpp_computes_what_quantcli_computes(wide_llama, tmp_path, ids, name, model, iterations):  # noqa: F811
    """Q4_0 on stories260K, Q4_K_M (Q4_K and Q6_K layers) on a random Llama 256 wide (its random weights need
    more steps to gain); the bounds are test_gguf_llamacpp's for the K-quants: llama.cpp rounds activations to 8
    bits in its matmuls."""
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    out = tmp_path / "out"
    report = quantcli.quantize(
        QuantizeConfig(
            bits=block_type(name).bits,
            **({"model": str(wide_llama)} if model else {}),
            method="blockround",
            output=out,
            eval=None,
            format="gguf",
            gguf_type=name,
            method_options={"iterations": iterations},
            calibration=CalibrationConfig(samples=16),
        )
    )
    error = report.stats["block_output_error"]
    assert error["blocks"] == (2 if model else 5) and error["tuned"] < error["start"]
    window = ids[:SEQ_LEN]
    a = llamacpp_logits(gguf_file(out), SEQ_LEN, threads=1, **F32_CACHE)(window)
    b = hf_logits(quantcli.load(out)[0])(window)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
