"""quantcli's GGUF files checked by llama.cpp itself on stories260K: it loads every type, computes what
quantcli's dequantized model of the same file computes, and tokenizes as the HF tokenizer does; the
K-quants on a random Llama 256 wide (stories260K's rows fit no block of 256), and their rounding
byte for byte against libggml's own quantizer. Skips unless `make llama-cpp` has built
llama-cpp-python (QUANTCLI_LLAMACPP or .llamacpp/)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import quantcli
from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
from quantcli.formats.gguf.kquant_layout import BLOCK_BYTES
from quantcli.formats.gguf.kquants import K_TYPES
from quantcli.formats.gguf.types import LEGACY as TYPES
from quantcli.formats.gguf.types import block_type, pack, round_to_nearest
from quantcli.formats.gguf.writer import gguf_file
from tests.support.gguf_harness import (
    LLAMACPP_DIR,
    eval_ids,
    eval_text,
    hf_logits,
    llama_cpp_module,
    llamacpp_logits,
    perplexity,
    window_nlls,
)

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
        quantcli.quantize(
            QuantizeConfig(
                bits=TYPES[name].bits,
                method=method,
                output=folder / f"{method}-{name}",
                eval=None,
                format="gguf",
                gguf_type=name,
                calibration=CalibrationConfig(samples=16),
            )
        )
    return {run: folder / f"{run[0]}-{run[1]}" for run in runs}


@pytest.fixture(scope="module")
def ids():
    from transformers import AutoTokenizer

    from quantcli.sources.models import EMBEDDED_MODEL

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
    assert perplexity(window_nlls(theirs, ids, SEQ_LEN)) == pytest.approx(
        perplexity(window_nlls(ours, ids, SEQ_LEN)), rel=2e-3
    )


def test_llamacpp_tokenizes_eval_text_as_the_hf_tokenizer(exported):
    from transformers import AutoTokenizer

    from quantcli.sources.models import EMBEDDED_MODEL

    text = eval_text("tinystories:eval")
    llm = llamacpp_logits(gguf_file(exported["rtn", "Q8_0"]), 8).llama
    assert (
        llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        == AutoTokenizer.from_pretrained(EMBEDDED_MODEL)(text)["input_ids"]
    )
    assert llm.token_bos() == 1 and llm.token_eos() == 2


def test_gpt2_file_runs_in_llamacpp(tiny_gpt2, tmp_path, prompt_ids):
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    quantcli.quantize(
        QuantizeConfig(
            bits=8, model=tiny_gpt2, method="rtn", output=tmp_path / "out", eval=None, format="gguf", gguf_type="Q8_0"
        )
    )
    ids = prompt_ids[0].tolist()
    a = llamacpp_logits(gguf_file(tmp_path / "out"), 64, threads=1, **F32_CACHE)(ids)
    b = hf_logits(quantcli.load(tmp_path / "out")[0])(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def _llamacpp_or_skip() -> None:
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")


def _libggml() -> ctypes.CDLL:
    library = LLAMACPP_DIR / "llama_cpp" / "lib" / "libggml-base.so"
    if not library.is_file():
        pytest.skip(f"llama.cpp unavailable: no {library} (run `make llama-cpp`)")
    return ctypes.CDLL(str(library))


@pytest.mark.parametrize("name", [*K_TYPES, "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_rounding_is_libggmls_quantizer_byte_for_byte_with_and_without_an_imatrix(stories_path, name):
    """quantcli's rounding against libggml's ``quantize_q4_K`` ... (``llama_model_quantize``'s per-tensor call):
    without an importance vector its reference quantizer (``quantize_row_q4_K_ref`` ...), with one (as an
    imatrix) its ``quantize_row_q4_K_impl`` ..., on every stories260K weight with rows cut to 256 and 768
    inputs (and edge rows: all zero, a constant sub-block, equal magnitudes of both signs) and a random
    importance vector per matrix, zero on some inputs."""
    from safetensors.torch import load_file

    ggml = _libggml()
    function = getattr(ggml, "quantize_" + name.lower().replace("_k", "_K"))
    function.restype = ctypes.c_size_t
    kind = block_type(name)
    row_bytes = BLOCK_BYTES.get(name) or {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}[name] * 8
    generator = torch.Generator().manual_seed(0)
    tensors = [v for v in load_file(f"{stories_path}/model.safetensors").values() if v.ndim == 2]
    matrices = [v.reshape(-1, width) for width in (256, 768) for v in tensors if v.numel() % width == 0]
    edges = torch.zeros(4, 256)
    edges[1, :32] = 0.25
    edges[2] = torch.linspace(-1, 1, 256)
    edges[3, 5], edges[3, 40] = -0.5, 0.5
    for matrix in [*matrices, edges]:
        random = torch.rand(matrix.shape[1], generator=generator) ** 2
        for importance in (None, torch.where(random < 0.05, 0.0, random)):
            values = np.ascontiguousarray(matrix.numpy(), dtype=np.float32)
            theirs = np.zeros((matrix.shape[0], row_bytes * matrix.shape[1] // 256), dtype=np.uint8)
            weights = None if importance is None else np.ascontiguousarray(importance.numpy(), dtype=np.float32)
            function(
                values.ctypes.data_as(ctypes.c_void_p),
                theirs.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_int64(matrix.shape[0]),
                ctypes.c_int64(matrix.shape[1]),
                None if weights is None else weights.ctypes.data_as(ctypes.c_void_p),
            )
            ours = pack(round_to_nearest(matrix, kind, importance))
            assert np.array_equal(ours, theirs), (name, matrix.shape, importance is not None)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, stories_path):
    """A random Llama whose rows are 256 and 512 wide (K-quant blocks fit), tied embeddings, with the stories260K
    tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_path).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "method,name",
    [("rtn", "Q4_K"), ("rtn", "Q6_K"), ("rtn", "Q4_K_M"), ("gptq", "Q4_K_M"), ("gptq-importance", "Q3_K_M")],
)
def test_llamacpp_runs_k_quant_files_as_quantcli_computes_them(wide_llama, tmp_path, ids, method, name):
    """llama.cpp loads quantcli's K-quant files (Q4_K_M: layer 0 Q4_K, layer 1's attn_v and ffn_down
    Q6_K, the tied head Q6_K; Q3_K_M: attn_q Q3_K, ffn_down Q4_K, with GPTQ's importance-steered scales)
    and its logits match quantcli's dequantized model of the same file.
    Measured: max |diff| 0.10-0.11 over logits spanning about +-3.5 (llama.cpp rounds activations to
    8 bits for K-quant matmuls), top-1 agreement 0.95-0.98 on the window."""
    import gguf

    _llamacpp_or_skip()
    out = tmp_path / "out"
    quantcli.quantize(
        QuantizeConfig(
            bits=block_type(name).bits,
            model=str(wide_llama),
            method=method.split("-")[0],
            output=out,
            eval=None,
            format="gguf",
            gguf_type=name,
            calibration=CalibrationConfig(samples=16),
            method_options={"importance": True} if method.endswith("importance") else {},
        )
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file(out)).tensors}
    expected = {  # ffn_down of layers 0 and 1, attn_q
        "Q4_K": ("Q4_K", "Q4_K", "Q4_K"),
        "Q6_K": ("Q6_K", "Q6_K", "Q6_K"),
        "Q4_K_M": ("Q4_K", "Q6_K", "Q4_K"),
        "Q3_K_M": ("Q4_K", "Q4_K", "Q3_K"),
    }[name]
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"], types["blk.0.attn_q.weight"]) == expected
    assert types["token_embd.weight"] == "Q6_K"
    window = ids[:SEQ_LEN]
    a = llamacpp_logits(gguf_file(out), SEQ_LEN, threads=1, **F32_CACHE)(window)
    b = hf_logits(quantcli.load(out)[0])(window)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ["Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_rtn_k_quant_file_is_llamacpps_own_quantization(wide_llama, tmp_path, name):
    """quantcli's RTN file and ``llama_model_quantize`` of llama.cpp's F32 conversion of the same model
    hold the same tensors, byte for byte, with the same types."""
    from tests.support.gguf_harness import MODELS, convert, quantize, same_tensors

    _llamacpp_or_skip()
    quantcli.quantize(
        QuantizeConfig(
            bits=block_type(name).bits,
            model=str(wide_llama),
            method="rtn",
            output=tmp_path / "out",
            eval=None,
            format="gguf",
            gguf_type=name,
        )
    )
    convert(wide_llama, tmp_path / "f32.gguf", "f32", MODELS["stories260K"]["tokenizer_model"])
    quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", name, threads=1)
    identical, typed, total = same_tensors(gguf_file(tmp_path / "out"), tmp_path / "theirs.gguf")
    assert identical == typed == total == 2 * 9 + 2  # per layer 7 weights and 2 norms; the embedding and the final norm
