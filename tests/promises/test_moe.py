"""Mixture-of-experts models (fused 3-D experts in transformers 5): every expert quantized as a layer of
its own, routers kept, and the checkpoint reloaded by plain transformers with identical logits."""

import json

import pytest
import torch

import quantcli
from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
from tests.conftest import logits
from tests.support.tiny_moe import build_tiny_moe

EXPERTS = 8


def _build(kind: str, folder) -> str:
    """A random tiny MoE in bfloat16 (as real MoE checkpoints ship) with the stories260K tokenizer."""
    return build_tiny_moe(
        kind, folder, hidden=64, head_dim=16, expert_width=96, dense_width=128, experts=EXPERTS, dtype=torch.bfloat16
    )


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def tiny_moe(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, _build(request.param, tmp_path_factory.mktemp(request.param))


def test_unfused_experts_compute_as_the_fused_module(tiny_moe):
    from quantcli.quant import moe

    kind, folder = tiny_moe
    model = quantcli.load(folder, device="cpu")[0]
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286]])
    fused = logits(model, ids)
    assert moe.unfuse(model) == []
    names = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".experts." in name
    ]
    expected = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}[kind]
    assert names[:3] == [f"model.layers.0.mlp.experts.0.{part}" for part in expected] and len(names) == 2 * EXPERTS * 3
    assert (logits(model, ids) - fused).abs().max() < 0.05  # separate gate and up matmuls, in bfloat16
    moe.refuse(model)
    assert torch.equal(logits(model, ids), fused)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_moe_int4_reloads_in_plain_transformers(tiny_moe, tmp_path, prompt_ids, method):
    from transformers import AutoModelForCausalLM

    kind, folder = tiny_moe
    options = {"calibration": CalibrationConfig(samples=16, seq_len=64)} if method == "gptq" else {}
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method=method, model=folder, output=tmp_path / "q", eval=None, embeddings=8, **options)
    )
    experts = [name for name in report.layers if ".experts." in name]
    assert len(experts) == 2 * EXPERTS * 3 and all(report.layers[name].bits == 4 for name in experts)
    assert report.skipped["model.layers.0.mlp.gate"].startswith("router: kept in 16 bits")
    assert report.size["breakdown"]["bits_per_weight"] <= 6.0
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert any(
        target.startswith("re:") and "experts" in target for group in saved.values() for target in group["targets"]
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours = quantcli.load(tmp_path / "q", device="cpu")[0]
    assert torch.equal(logits(plain, prompt_ids), logits(ours, prompt_ids))
    original = logits(quantcli.load(folder, device="cpu")[0], prompt_ids)
    assert 0 < (logits(ours, prompt_ids) - original).abs().max() < 1.0


def test_gptq_reports_tokens_per_expert_and_rounds_under_calibrated_experts(tiny_moe, tmp_path):
    kind, folder = tiny_moe
    calibration = CalibrationConfig(samples=16, seq_len=64)
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method="gptq", model=folder, output=tmp_path / "q", eval=None, calibration=calibration)
    )
    routed = report.stats["tokens_per_expert"]
    assert sorted(routed) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(len(counts) == EXPERTS and sum(counts) == 16 * 64 * 2 for counts in routed.values())  # top-2 routing
    assert report.stats["calibration_groups"] == 2 * 4  # q/k/v, o, every expert's gate/up, every expert's down
    assert min(min(counts) for counts in routed.values()) >= 96 and report.stats["experts_rounded_to_nearest"] == 0
    few = quantcli.quantize(
        QuantizeConfig(
            bits=4,
            method="gptq",
            model=folder,
            output=tmp_path / "few",
            eval=None,
            calibration=CalibrationConfig(samples=1, seq_len=16),
        )
    )
    experts = [name for name in few.layers if ".experts." in name]
    assert few.stats["experts_rounded_to_nearest"] == len(experts)  # 32 routed tokens in all, < 64 inputs each
    down = {"qwen3_moe": "down_proj", "mixtral": "w2"}[kind]
    note = few.layers[f"model.layers.0.mlp.experts.0.{down}"].note
    assert "calibration tokens were routed to this expert, fewer than its 96 inputs" in note


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streaming_writes_what_the_in_memory_run_writes(tiny_moe, tmp_path, method):
    from safetensors import safe_open

    kind, folder = tiny_moe
    options = {"calibration": CalibrationConfig(samples=16, seq_len=64)} if method == "gptq" else {}
    for name, low_memory in (("memory", False), ("streamed", True)):
        quantcli.quantize(
            QuantizeConfig(
                bits=4, method=method, model=folder, output=tmp_path / name, eval=None, low_memory=low_memory, **options
            )
        )
    tensors = {}
    for name in ("memory", "streamed"):
        tensors[name] = {}
        for file in sorted((tmp_path / name).glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                tensors[name].update({key: handle.get_tensor(key) for key in handle.keys()})
    assert sorted(tensors["memory"]) == sorted(tensors["streamed"])
    assert any(".experts.7." in key for key in tensors["memory"])
    assert all(torch.equal(tensors["memory"][key], tensors["streamed"][key]) for key in tensors["memory"])
    assert (
        quantcli.inspect(tmp_path / "streamed")["layers"].keys()
        == quantcli.inspect(tmp_path / "memory")["layers"].keys()
    )


def test_streamed_gptq_resumes_an_interrupted_moe_run(tiny_moe, tmp_path):
    from quantcli.errors import ResumableInterrupt
    from tests.support.hostile import StopAfter

    kind, folder = tiny_moe
    recipe = dict(
        bits=4,
        method="gptq",
        model=folder,
        eval=None,
        low_memory=True,
        calibration=CalibrationConfig(samples=16, seq_len=64),
    )
    whole = quantcli.quantize(QuantizeConfig(output=tmp_path / "whole", **recipe))
    per_block = 4 + 3 * EXPERTS  # q, k, v, o and every expert's three projections
    with pytest.raises(ResumableInterrupt, match="interrupted after 1 of 5 layer groups"):
        quantcli.quantize(QuantizeConfig(output=tmp_path / "resumed", **recipe), StopAfter(per_block + 1))
    resumed = quantcli.quantize(QuantizeConfig(output=tmp_path / "resumed", resume=True, **recipe))
    assert resumed.stats["resumed_shards"] == 1 and list(resumed.stats["tokens_per_expert"]) == [
        "model.layers.1.mlp.experts"
    ]
    assert (
        resumed.stats["tokens_per_expert"]["model.layers.1.mlp.experts"]
        == whole.stats["tokens_per_expert"]["model.layers.1.mlp.experts"]
    )
    for shard in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "resumed" / shard.name).read_bytes()


def test_per_layer_precision_is_refused_for_experts(tiny_moe, tmp_path):
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    kind, folder = tiny_moe
    result = CliRunner().invoke(app, ["quantize", folder, "--target-bpw", "6", "-o", str(tmp_path / "q"), "--no-eval"])
    assert result.exit_code == 2 and not (tmp_path / "q").exists()
    assert result.stderr.strip() == (
        "error: --target-* cannot mix widths across the experts of a mixture-of-experts model: transformers 5.25"
        " decompresses every expert with one scheme at load. Drop --target-* and pass --bits."
    )
