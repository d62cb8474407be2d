"""llama.cpp as the instrument (tests/support/gguf_harness.py) on stories260K: the harness scores
exactly quantcli's windows, and llama.cpp's own F32 conversion and Q8_0 agree with transformers.
Tests that run llama.cpp skip unless `make llama-cpp` has built it into .llamacpp/."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.gguf_harness import (
    HARNESS_TOLERANCE_PCT,
    MODELS,
    convert,
    eval_ids,
    eval_text,
    hf_logits,
    llama_cpp_module,
    llamacpp_logits,
    perplexity,
    quantize,
    window_nlls,
)

SEQ_LEN = 256
TOKENS = 4096


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return tokenizer, model, eval_ids(tokenizer, "tinystories:eval", TOKENS)


@pytest.mark.parametrize("stride", [SEQ_LEN, 96])
def test_harness_windows_are_quantcli_windows(stories, stride):
    from quantcli.measure.perplexity import evaluate_sequences

    _, model, ids = stories
    nlls = window_nlls(hf_logits(model), ids, SEQ_LEN, stride)
    reference = evaluate_sequences(model, [torch.tensor(ids)], SEQ_LEN, stride)
    # without overlap each window scores all positions but its first; with overlap, every token but the first
    assert (
        nlls.size == reference.tokens_scored == (TOKENS // SEQ_LEN * (SEQ_LEN - 1) if stride == SEQ_LEN else TOKENS - 1)
    )
    assert perplexity(nlls) == pytest.approx(reference.perplexity, rel=1e-6)


@pytest.fixture(scope="module")
def ggufs(stories_path, tmp_path_factory):
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    folder = tmp_path_factory.mktemp("gguf")
    f32, q8 = folder / "stories260K-F32.gguf", folder / "stories260K-Q8_0.gguf"
    convert(stories_path, f32, "f32", MODELS["stories260K"]["tokenizer_model"])
    quantize(f32, q8, "Q8_0", threads=1)
    return f32, q8


def test_llamacpp_f32_perplexity_equals_transformers(stories, ggufs):
    _, model, ids = stories
    ours = perplexity(window_nlls(llamacpp_logits(ggufs[0], SEQ_LEN, threads=1), ids, SEQ_LEN))
    theirs = perplexity(window_nlls(hf_logits(model), ids, SEQ_LEN))
    assert abs(100 * (ours / theirs - 1)) <= HARNESS_TOLERANCE_PCT, (ours, theirs)


def test_llamacpp_q8_0_logits_close_to_f32(stories, ggufs):
    """Measured on this window (logits span about +-22): F32 GGUF vs transformers 4e-5 with an F32
    KV cache and 0.028 with llama.cpp's default F16 one; Q8_0 vs F32 0.55, top-1 agreement 0.98."""
    _, model, ids = stories
    window = ids[:SEQ_LEN]
    hf = hf_logits(model)(window)
    exact = llamacpp_logits(ggufs[0], SEQ_LEN, threads=1, type_k=0, type_v=0)(window)  # GGML_TYPE_F32 cache
    f32 = llamacpp_logits(ggufs[0], SEQ_LEN, threads=1)(window)
    q8 = llamacpp_logits(ggufs[1], SEQ_LEN, threads=1)(window)
    assert q8.shape == f32.shape == exact.shape == hf.shape == (SEQ_LEN, 512)
    assert np.abs(exact - hf).max() < 1e-3
    assert np.abs(f32 - hf).max() < 0.1
    assert 0 < np.abs(q8 - f32).max() < 1.0
    assert (q8.argmax(-1) == f32.argmax(-1)).mean() >= 0.95


def test_llamacpp_tokenizer_gives_hf_ids(stories, ggufs):
    tokenizer, _, _ = stories
    text = eval_text("tinystories:eval")[:20000]
    llm = llamacpp_logits(ggufs[0], SEQ_LEN, threads=1).llama
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tokenizer(text)["input_ids"]


def test_quantcli_eval_of_a_llamacpp_file_is_llamacpps_perplexity(stories, ggufs):
    """``quantcli eval FILE.gguf`` (transformers' GGUF loader, dequantized) on llama.cpp's own Q8_0:
    measured 0.01% from llama.cpp's perplexity on the same tokens; the bar is 0.5%."""
    from quantcli.config.quantize import EvalConfig
    from quantcli.measure.evaluation import evaluate

    _, _, ids = stories
    theirs = perplexity(window_nlls(llamacpp_logits(ggufs[1], SEQ_LEN, threads=1), ids, SEQ_LEN))
    ours = evaluate(str(ggufs[1]), EvalConfig(seq_len=SEQ_LEN, max_tokens=TOKENS))
    assert ours["tokens_scored"] == len(ids) - len(ids) // SEQ_LEN
    assert abs(100 * (ours["perplexity"] / theirs - 1)) <= 0.5, (ours["perplexity"], theirs)


def test_quantcli_rtn_gguf_is_llamacpps_own_quantization(ggufs, tmp_path):
    """quantcli's RTN on a GGUF type writes, tensor for tensor, the bytes llama.cpp's quantizer writes."""
    from gguf import GGUFReader

    import quantcli
    from quantcli.config.quantize import QuantizeConfig
    from quantcli.formats.gguf.writer import gguf_file

    quantcli.quantize(
        QuantizeConfig(bits=8, method="rtn", output=tmp_path / "q", eval=None, format="gguf", gguf_type="Q8_0")
    )
    ours = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(gguf_file(tmp_path / "q")).tensors}
    theirs = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(ggufs[1]).tensors}
    assert ours.keys() == theirs.keys()
    assert all(ours[name] == theirs[name] for name in ours), [name for name in ours if ours[name] != theirs[name]]
