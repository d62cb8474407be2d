"""quantcli's GGUF files checked by llama.cpp itself on stories260K: it loads every type, computes what
quantcli's dequantized model of the same file computes, and tokenizes as the HF tokenizer does.
Skips unless `make llama-cpp` has built llama-cpp-python (QUANTCLI_LLAMACPP or .llamacpp/)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gguf_harness import hf_logits, llama_cpp_module, llamacpp_logits, perplexity, window_nlls  # noqa: E402
from benchmarks.llamacpp import eval_ids, eval_text  # noqa: E402

import quantcli  # noqa: E402
from quantcli.config import CalibrationConfig, QuantizeConfig  # noqa: E402
from quantcli.formats.gguf import gguf_file  # noqa: E402
from quantcli.formats.gguf_grid import TYPES  # noqa: E402

SEQ_LEN = 256
TOKENS = 2048
F32_CACHE = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32 KV cache: no cache rounding in the comparison


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every type by rtn, and Q4_0 by gptq (16 calibration windows to keep it quick)."""
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    folder = tmp_path_factory.mktemp("gguf-out")
    runs = [("rtn", name) for name in TYPES] + [("gptq", "Q4_0")]
    for method, name in runs:
        quantcli.quantize(QuantizeConfig(
            bits=TYPES[name].bits, method=method, output=folder / f"{method}-{name}", eval=None, format="gguf", gguf_type=name,
            calibration=CalibrationConfig(samples=16),
        ))
    return {run: folder / f"{run[0]}-{run[1]}" for run in runs}


@pytest.fixture(scope="module")
def ids():
    from transformers import AutoTokenizer

    from quantcli.models import EMBEDDED_MODEL

    return eval_ids(AutoTokenizer.from_pretrained(EMBEDDED_MODEL), "tinystories:eval", TOKENS)


@pytest.mark.parametrize("method,name", [("rtn", name) for name in TYPES] + [("gptq", "Q4_0")])
def test_llamacpp_computes_what_quantcli_computes_from_the_same_file(exported, ids, method, name):
    """llama.cpp multiplies block weights with activations it rounds to 8 bits, so logits differ by
    its arithmetic, not by the file (its own Q8_0 vs its F32 differ by 0.55, test_llamacpp.py). Measured
    with an F32 KV cache: max |diff| 0.30-0.37 over logits spanning about +-22, top-1 agreement
    0.97-0.99 on the window, perplexity within 0.11% (GPTQ Q4_0; RTN 0.01-0.09%) on 2,048 tokens."""
    folder = exported[method, name]
    model = quantcli.load(folder)[0]
    theirs = llamacpp_logits(gguf_file(folder), SEQ_LEN, threads=1, **F32_CACHE)
    ours = hf_logits(model)
    window = ids[:SEQ_LEN]
    a, b = theirs(window), ours(window)
    assert a.shape == b.shape == (SEQ_LEN, 512)
    assert np.abs(a - b).max() < 0.75
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95
    assert perplexity(window_nlls(theirs, ids, SEQ_LEN)) == pytest.approx(perplexity(window_nlls(ours, ids, SEQ_LEN)), rel=2e-3)


def test_llamacpp_tokenizes_eval_text_as_the_hf_tokenizer(exported):
    from transformers import AutoTokenizer

    from quantcli.models import EMBEDDED_MODEL

    text = eval_text("tinystories:eval")
    llm = llamacpp_logits(gguf_file(exported["rtn", "Q8_0"]), 8).llama
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(text)["input_ids"]
    assert llm.token_bos() == 1 and llm.token_eos() == 2


def test_gpt2_file_runs_in_llamacpp(tiny_gpt2, tmp_path, prompt_ids):
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    quantcli.quantize(QuantizeConfig(bits=8, model=tiny_gpt2, method="rtn", output=tmp_path / "out", eval=None, format="gguf", gguf_type="Q8_0"))
    ids = prompt_ids[0].tolist()
    a = llamacpp_logits(gguf_file(tmp_path / "out"), 64, threads=1, **F32_CACHE)(ids)
    b = hf_logits(quantcli.load(tmp_path / "out")[0])(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
