"""No silent non-quantization: the report states the share of matmul weights quantized, and warns in
one console line and in the JSON when more than 5% stay full precision without being asked."""

import pytest
from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app
from quantcli.config.quantize import QuantizeConfig
from tests.promises.test_moe import _build


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory) -> str:
    return _build("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def test_moe_rtn_quantizes_every_expert_and_keeps_only_routers(tiny_qwen3_moe, tmp_path):
    report = quantcli.quantize(
        QuantizeConfig(bits=4, method="rtn", model=tiny_qwen3_moe, output=tmp_path / "q", eval=None, embeddings=8)
    )
    weights = report.weights
    assert weights["warning"] is None and weights["quantized_share"] > 0.99
    router = "router: kept in 16 bits (small and sensitive: it picks the experts)"
    assert weights["kept_parameters"] == {router: 2 * 8 * 64}  # two layers' [8 experts, 64] routers
    assert weights["quantized_parameters"] + 2 * 8 * 64 == weights["matmul_parameters"]


def test_methods_that_keep_fused_experts_say_so(tiny_qwen3_moe, tmp_path):
    pytest.importorskip("bitsandbytes")
    report = quantcli.quantize(
        QuantizeConfig(bits=8, method="bnb-int8", model=tiny_qwen3_moe, output=tmp_path / "q", eval=None)
    )
    assert report.weights["unasked_share"] > 0.9
    assert report.weights["warning"].endswith("the largest part: " + report.skipped["model.layers.0.mlp.experts"])
    assert report.skipped["model.layers.0.mlp.experts"].startswith("fused experts (3-D parameters) kept in 16 bits")


def test_transformers_bitsandbytes_leaves_fused_experts_unquantized(tiny_qwen3_moe):
    """Why bitsandbytes methods keep experts in 16 bits: transformers' own bitsandbytes loading of the same
    model quantizes its Linear layers and leaves the fused experts full precision, so no bitsandbytes
    checkpoint it reloads can hold quantized experts. When this fails, transformers gained expert support."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, quantization_config=config, device_map="cpu")
    experts = model.model.layers[0].mlp.experts
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert {parameter.dtype for parameter in experts.parameters()} <= {torch.float32, torch.bfloat16, torch.float16}
    assert experts.gate_up_proj.dim() == 3


def test_what_the_user_asked_to_keep_does_not_warn(stories_path, tmp_path):
    report = quantcli.quantize(
        QuantizeConfig(
            bits=4,
            method="rtn",
            model=stories_path,
            output=tmp_path / "q",
            eval=None,
            skip_modules=("*.mlp.*",),
            embeddings="keep",
        )
    )
    assert report.weights["quantized_share"] < 0.5 and report.weights["warning"] is None
    assert report.weights["kept_parameters"]["matched --skip-modules"] > 0


def test_console_warns_in_one_line(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D layers are stored dense by compressed-tensors output: most weights stay 32-bit."""
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            tiny_gpt2,
            "--bits",
            "4",
            "--method",
            "rtn",
            "--embeddings",
            "8",
            "-o",
            str(tmp_path / "q"),
            "--no-eval",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("warning ")]
    assert lines == [
        "warning 78% of the matmul weights stay in full precision without being asked; the largest part:"
        " stored dense (fake-quantized): compressed-tensors cannot pack GPT-2 Conv1D so that transformers"
        " reloads it; --format gguf stores GPT-2 packed (llama.cpp reads it)"
    ]
    assert "weights quantized: 22.1% of 148,480 matmul parameters" in result.stdout


def test_a_16_bit_cast_keeps_everything_without_a_warning(tiny_qwen3_moe, tmp_path):
    report = quantcli.quantize(
        QuantizeConfig(bits=16, method="cast", model=tiny_qwen3_moe, output=tmp_path / "q", eval=None)
    )
    assert report.weights["quantized_share"] == 0 and report.weights["warning"] is None
