"""GGUF output of mixture-of-experts models (Mixtral as llama.cpp's ``llama`` with experts, Qwen3-MoE as
``qwen3moe``): each expert rounded on the type's block grid as a dense layer, the experts of a projection
stacked as llama.cpp's ``ffn_*_exps`` tensors, the router F32; ``quantcli eval`` reads the file back
(quantcli.sources.gguf_experts), and llama.cpp loads it, writes the same bytes from its own conversion
(rtn) and computes what quantcli computes. The llama.cpp checks skip unless `make llama-cpp` has built
llama-cpp-python; the SmolLM2-MoE acceptance check also needs `make smollm2-moe` and QUANTCLI_SLOW_TESTS=1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.errors import UnavailableError
from quantcli.formats.gguf.kquants import K_TYPES
from quantcli.formats.gguf.types import block_type, dequantize, round_to_nearest, tensor_type
from quantcli.formats.gguf.writer import gguf_file
from tests.support.gguf_harness import (
    MODELS,
    convert,
    eval_ids,
    hf_logits,
    llama_cpp_module,
    llamacpp_logits,
    perplexity,
    quantize,
    same_tensors,
    window_nlls,
)
from tests.support.models import REPO
from tests.support.tiny_moe import build_tiny_moe

SEQ_LEN = 256
F32_CACHE = {"type_k": 0, "type_v": 0}
ROUTER_SCALE = 20  # decisive routing: llama.cpp's 8-bit activations must not flip a near-tie between experts


def _build(kind: str, folder, experts: int, stories_path: str, **qwen3_moe) -> str:
    """A random MoE 256 wide (K-quant blocks fit), 2 layers, fp32, decisive routers, the stories260K tokenizer
    (``stories_path``, the embedded model's: the builder saves that one); ``qwen3_moe`` overrides its config."""
    return build_tiny_moe(
        kind,
        folder,
        hidden=256,
        head_dim=64,
        expert_width=256,
        dense_width=512,
        experts=experts,
        dtype=torch.float32,
        router_scale=ROUTER_SCALE,
        qwen3_moe={"norm_topk_prob": True, **qwen3_moe},
        initializer_range=0.05,
    )


@pytest.fixture(scope="module")
def moe(tmp_path_factory, stories_path):
    """``moe(kind, experts)``: the folder of that tiny model, built once."""
    built = {}

    def folder(kind: str, experts: int = 4) -> str:
        if (kind, experts) not in built:
            built[kind, experts] = _build(kind, tmp_path_factory.mktemp(f"{kind}-{experts}"), experts, stories_path)
        return built[kind, experts]

    return folder


@pytest.fixture(scope="module")
def written(moe, tmp_path_factory):
    """``written(kind, method, type, experts)``: (output folder, report) of that run, made once."""
    runs = {}

    def run(kind: str, method: str, name: str, experts: int = 4):
        key = (kind, method, name, experts)
        if key not in runs:
            out = tmp_path_factory.mktemp("out") / "-".join(map(str, key))
            report = quantcli.quantize(
                QuantizeConfig(
                    bits=block_type(name).bits,
                    model=moe(kind, experts),
                    method=method,
                    output=out,
                    format="gguf",
                    gguf_type=name,
                    eval=EvalConfig(max_tokens=1024, seq_len=SEQ_LEN),
                    calibration=CalibrationConfig(samples=16, seq_len=64),
                )
            )
            runs[key] = out, report
        return runs[key]

    return run


def _llamacpp_or_skip() -> None:
    try:
        llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_experts_are_stacked_as_llamacpps_expert_tensors(moe, written, kind):
    """Expert e of ``blk.N.ffn_gate_exps`` is that expert's gate matrix rounded alone (rtn), as a dense
    layer would be; Q4_K_M's rule gives the last layer's ffn_down_exps Q6_K; the router stays F32."""
    from safetensors.torch import load_file

    out, _ = written(kind, "rtn", "Q4_K_M")
    reader = gguf.GGUFReader(gguf_file(out))
    tensors = {t.name: t for t in reader.tensors}
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[kind]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.expert_count"].contents() == 4
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    types = {name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for name, t in tensors.items()}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_up_exps.weight"] == ("Q4_K", (256, 256, 4))
    assert types["blk.0.ffn_down_exps.weight"] == ("Q4_K", (256, 256, 4))
    assert types["blk.1.ffn_down_exps.weight"] == ("Q6_K", (256, 256, 4))
    assert types["blk.1.ffn_gate_inp.weight"] == ("F32", (256, 4))
    if kind == "qwen3_moe":
        assert reader.fields["qwen3moe.expert_feed_forward_length"].contents() == 256
        assert types["blk.0.attn_q_norm.weight"] == ("F32", (64,))
    original = load_file(f"{moe(kind)}/model.safetensors")
    source = {"mixtral": "model.layers.1.block_sparse_moe.experts.{}.w1.weight", "qwen3_moe": None}[kind]
    stacked = gguf.quants.dequantize(tensors["blk.1.ffn_gate_exps.weight"].data, gguf.GGMLQuantizationType.Q4_K)
    for expert in range(4):
        if source:
            matrix = original[source.format(expert)]
        else:  # transformers 5 saves Qwen3-MoE's experts per expert as well
            matrix = original[f"model.layers.1.mlp.experts.{expert}.gate_proj.weight"]
        assert np.array_equal(stacked[expert], dequantize(round_to_nearest(matrix, K_TYPES["Q4_K"])).numpy())


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_eval_of_a_moe_gguf_folder_is_the_model_the_run_measured(written, kind, tmp_path):
    """transformers' GGUF loader builds a dense Llama from a Mixtral file and gives a Qwen3-MoE file its
    default expert width; quantcli reads both as the model it measured after quantizing."""
    out, report = written(kind, "rtn", "Q4_K_M")
    model = quantcli.load(out)[0]
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[kind]
    result = CliRunner().invoke(app, ["eval", str(out), "--json", "-q", "--max-tokens", "1024", "--seq-len", "256"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(report.perplexity_after.perplexity, rel=1e-6)


def test_eight_experts_get_the_types_llamacpp_bumps():
    """Mixtral's 8 experts: llama.cpp gives attn_k/attn_v Q8_0 in every type and attn_output Q5_K in Q4_K_M."""
    q4_0, q4_k_m = block_type("Q4_0"), block_type("Q4_K_M")
    assert tensor_type(q4_0, "blk.3.attn_v.weight", 256, 32, experts=8) == (
        "Q8_0",
        "Q8_0: llama.cpp's Q4_0 gives this layer more bits",
    )
    assert tensor_type(q4_0, "blk.3.attn_k.weight", 256, 32, experts=8)[0] == "Q8_0"
    assert tensor_type(q4_0, "blk.3.attn_k.weight", 256, 32, experts=4)[0] == "Q4_0"
    assert tensor_type(q4_k_m, "blk.31.ffn_down_exps.weight", 256, 32, experts=8)[0] == "Q6_K"
    if "Q5_K" in K_TYPES:
        assert tensor_type(q4_k_m, "blk.3.attn_output.weight", 256, 32, experts=8)[0] == "Q5_K"
    else:
        with pytest.raises(UnavailableError, match="gives blk.3.attn_output.weight of an 8-expert model Q5_K"):
            tensor_type(q4_k_m, "blk.3.attn_output.weight", 256, 32, experts=8)


def test_a_moe_llamacpp_would_compute_differently_is_refused(tmp_path, stories_path):
    folder = _build("qwen3_moe", tmp_path / "qwen", 4, stories_path, norm_topk_prob=False)
    args = ["quantize", folder, "--format", "gguf", "--gguf-type", "Q8_0", "--no-eval", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 5 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == (
        "error: GGUF output writes mixture-of-experts models as llama.cpp computes them: experts in every layer, their"
        " top-k weights renormalised; this model has norm_topk_prob=False."
    )


@pytest.mark.parametrize("name,experts", [("Q4_K_M", 4), ("Q4_0", 8)])
def test_rtn_moe_file_is_llamacpps_own_quantization(moe, written, tmp_path, name, experts):
    """quantcli's rtn file and ``llama_model_quantize`` of llama.cpp's own F32 conversion of the same Mixtral
    hold the same tensors byte for byte (8 experts: attn_k and attn_v Q8_0, as llama.cpp bumps them)."""
    _llamacpp_or_skip()
    out, _ = written("mixtral", "rtn", name, experts)
    convert(moe("mixtral", experts), tmp_path / "f32.gguf", "f32", MODELS["stories260K"]["tokenizer_model"])
    quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", name, threads=1)
    identical, typed, total = same_tensors(gguf_file(out), tmp_path / "theirs.gguf")
    assert identical == typed == total == 2 * 10 + 3  # per layer 4 attention, router, 3 experts, 2 norms
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file(out)).tensors}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == ("Q8_0" if experts == 8 else "Q4_K")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_gptq_on_the_grid_calibrates_each_expert_on_its_routed_tokens(written, kind):
    _, report = written(kind, "gptq", "Q4_K_M")
    routed = report.stats["tokens_per_expert"]
    assert sorted(routed) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(len(counts) == 4 and sum(counts) == 16 * 64 * 2 for counts in routed.values())  # top-2 routing
    rounded = [name for name, layer in report.layers.items() if "calibration tokens were routed" in (layer.note or "")]
    assert report.stats["experts_rounded_to_nearest"] == len(rounded)
    assert all(min(counts) >= 256 for counts in routed.values()) == (not rounded)  # 256 inputs per expert layer


@pytest.fixture(scope="module")
def ids():
    from transformers import AutoTokenizer

    from quantcli.sources.models import EMBEDDED_MODEL

    return eval_ids(AutoTokenizer.from_pretrained(EMBEDDED_MODEL), "tinystories:eval", 2048)


@pytest.mark.parametrize(
    "kind,method,name",
    [
        ("mixtral", "rtn", "Q4_K_M"),
        ("qwen3_moe", "rtn", "Q4_K_M"),
        ("mixtral", "gptq", "Q4_K_M"),
        ("qwen3_moe", "gptq", "Q4_0"),
    ],
)
def test_llamacpp_runs_moe_files_as_quantcli_computes_them(written, ids, kind, method, name):
    """llama.cpp rounds activations to 8 bits in block-quantized matmuls (its F32 file of the same
    dequantized weights matches quantcli to 3e-5), and an expert chosen by a narrow margin can flip, so
    single logits differ more than in a dense model. Measured: max |diff| 0.56-0.90 over logits spanning
    about +-3.6, mean |diff| 0.020-0.025, top-1 agreement 0.92-0.96 on the window, perplexity within
    0.15% on 2,048 tokens."""
    _llamacpp_or_skip()
    out, _ = written(kind, method, name)
    theirs = llamacpp_logits(gguf_file(out), SEQ_LEN, threads=1, **F32_CACHE)
    ours = hf_logits(quantcli.load(out)[0])
    a, b = theirs(ids[:SEQ_LEN]), ours(ids[:SEQ_LEN])
    assert np.abs(a - b).mean() < 0.015 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.85
    assert perplexity(window_nlls(theirs, ids, SEQ_LEN)) == pytest.approx(
        perplexity(window_nlls(ours, ids, SEQ_LEN)), rel=5e-3
    )


SMOLLM2_MOE = Path(os.environ.get("QUANTCLI_SMOLLM2_MOE") or REPO / ".models" / "SmolLM2-135M-MoE")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("QUANTCLI_SLOW_TESTS"),
    reason="quantizes and scores the 1.4 GB SmolLM2-MoE twice (~10 min of CPU): set QUANTCLI_SLOW_TESTS=1",
)
@pytest.mark.skipif(
    not (SMOLLM2_MOE / "config.json").is_file(), reason=f"no SmolLM2-MoE at {SMOLLM2_MOE}: run `make smollm2-moe`"
)
def test_smollm2_moe_q4_k_m_scores_the_same_in_llamacpp_and_quantcli(tmp_path):
    """Acceptance (issue 24): the upcycled SmolLM2-MoE as Q4_K_M loads in llama.cpp, and llama.cpp's
    perplexity of the file (default F16 KV cache) is within 0.5% of ``quantcli eval`` of the same file,
    on the WikiText eval text and windows every llama.cpp check uses (gguf_harness.MODELS["smollm2"])."""
    from transformers import AutoTokenizer

    _llamacpp_or_skip()
    spec = MODELS["smollm2"]
    quantcli.quantize(
        QuantizeConfig(
            bits=4,
            model=str(SMOLLM2_MOE),
            method="rtn",
            output=tmp_path / "q",
            eval=None,
            format="gguf",
            gguf_type="Q4_K_M",
        )
    )
    ids = eval_ids(AutoTokenizer.from_pretrained(SMOLLM2_MOE), spec["dataset"], spec["max_tokens"])
    theirs = perplexity(
        window_nlls(llamacpp_logits(gguf_file(tmp_path / "q"), spec["seq_len"], 2), ids, spec["seq_len"])
    )
    evaluation = EvalConfig(dataset=str(REPO / spec["dataset"]), seq_len=spec["seq_len"], max_tokens=spec["max_tokens"])
    ours = quantcli.evaluate(str(gguf_file(tmp_path / "q")), evaluation)
    assert ours["tokens_scored"] == len(ids) - len(ids) // spec["seq_len"]
    assert abs(theirs / ours["perplexity"] - 1) < 5e-3, (theirs, ours["perplexity"])
