"""W8A8 (``--activations int8``) and SmoothQuant smoothing on the embedded stories260K: the checkpoint
is what vLLM's int8 path reads, quantcli's eval and reload really quantize the activations (what an
integer matmul computes), smoothing leaves the full-precision model's function unchanged, and every
request the int8 path cannot serve is refused before any work. vLLM itself: tests/formats/test_vllm.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app
from quantcli.config.quantize import EvalConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.methods import get_method
from quantcli.quant.activations import quantize_tokens, quantized_input_layers
from quantcli.quant.smoothing import smooth
from quantcli.sources.models import load_model, load_tokenizer
from tests.conftest import logits

EVAL = EvalConfig(max_tokens=2048)


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w8a8")
    runs = {
        "weight-only": {},
        "w8a8": {"activations": "int8"},
        "smoothed": {"activations": "int8", "smoothing": 0.5},
    }
    reports = {
        name: quantcli.quantize(
            QuantizeConfig(bits=8, method="rtn", output=folder / name, eval=EVAL, method_options=options)
        )
        for name, options in runs.items()
    }
    return folder, reports


def test_w8a8_checkpoint_is_vllms_int8_scheme(w8a8):
    folder, reports = w8a8
    config = json.loads((folder / "w8a8" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["format"] == "int-quantized"
    assert (
        group["weights"]["strategy"] == "channel"
        and group["weights"]["symmetric"]
        and group["weights"]["num_bits"] == 8
    )
    assert {
        key: group["input_activations"][key] for key in ("num_bits", "type", "strategy", "dynamic", "symmetric")
    } == {
        "num_bits": 8,
        "type": "int",
        "strategy": "token",
        "dynamic": True,
        "symmetric": True,
    }
    assert reports["w8a8"].options["activations"] == "int8"
    weight_only = json.loads((folder / "weight-only" / "config.json").read_text())["quantization_config"]
    assert {g["format"] for g in weight_only["config_groups"].values()} == {
        "pack-quantized"
    }  # W8A16, no input activations
    assert all(g["input_activations"] is None for g in weight_only["config_groups"].values())


def test_eval_and_reload_quantize_the_activations(w8a8):
    folder, reports = w8a8
    assert reports["w8a8"].perplexity_after.perplexity != reports["weight-only"].perplexity_after.perplexity
    model = quantcli.load(folder / "w8a8")[0]
    assert len(quantized_input_layers(model)) == 35  # every linear; the embedding is kept
    again = quantcli.evaluate(str(folder / "w8a8"), EVAL, device="cpu")
    assert again["perplexity"] == reports["w8a8"].perplexity_after.perplexity
    assert quantized_input_layers(quantcli.load(folder / "weight-only")[0]) == []


def test_a_w8a8_layer_computes_the_integer_product(w8a8):
    """What vLLM's int8 kernel computes: int32 sums of int8 activations times int8 weights, rescaled by
    the token's and the channel's scales."""
    from safetensors.torch import load_file

    folder, _ = w8a8
    model = quantcli.load(folder / "w8a8")[0]
    stored = load_file(folder / "w8a8" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    layer = dict(model.named_modules())[name]
    torch.manual_seed(0)
    x = torch.randn(5, layer.in_features) * torch.linspace(0.1, 8, layer.in_features)  # a few large channels
    scale_x = x.abs().amax(-1, keepdim=True) / 127
    x_q = torch.clamp(torch.round(x / scale_x), -128, 127)
    w_q, scale_w = stored[name + ".weight"].double(), stored[name + ".weight_scale"].double()
    expected = (x_q.double() @ w_q.T) * scale_x.double() * scale_w.T
    with torch.no_grad():
        assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(quantize_tokens(x), (x_q * scale_x).to(x.dtype))


def test_smoothing_keeps_the_function_and_moves_the_outliers(stories_path, prompt_ids):
    from quantcli.sources.datasets import calibration_batch, read_documents

    model = load_model(stories_path, torch.float32, "cpu")
    tokenizer = load_tokenizer(stories_path, False)
    before = logits(model, prompt_ids)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    done = smooth(model, calibration_batch(read_documents("tinystories:calib"), tokenizer, 16, 128, 0), 0.5)
    assert done["pairs"] == 10 and done["factor_range"][1] > 1  # 5 blocks x (attention, MLP)
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)
    assert torch.allclose(logits(model, prompt_ids), before, atol=1e-4)


def test_smoothing_is_recorded(w8a8):
    _, reports = w8a8
    record = reports["smoothed"].stats["smoothing"]
    assert record["alpha"] == 0.5 and record["pairs"] == 10 and record["calibration_windows"] == 128


@pytest.mark.parametrize(
    "bits,options,message",
    [
        (4, {"activations": "int8"}, "activations='int8' quantizes 8-bit weights (W8A8); use bits=8, not 4."),
        (8, {"activations": "int8", "group_size": 32}, "activations='int8' takes one weight scale per output channel"),
        (
            8,
            {"activations": "int8", "symmetric": False, "observer": "minmax"},
            "activations='int8' needs symmetric weights",
        ),
        (8, {"activations": "int4"}, "activations takes int8 (W8A8), got 'int4'."),
        (
            8,
            {"smoothing": 0.5},
            "smoothing moves activation outliers into the weights for W8A8; add activations='int8'.",
        ),
        (
            8,
            {"activations": "int8", "smoothing": 1.5},
            "smoothing is SmoothQuant's migration strength, between 0 and 1",
        ),
    ],
)
def test_requests_the_int8_path_cannot_serve_are_refused(bits, options, message):
    with pytest.raises(InputError) as error:
        get_method("rtn").make_config(bits, options)
    assert message in str(error.value)


def test_cli_refusals_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "quantize",
            "-b",
            "8",
            "--activations",
            "int8",
            "--format",
            "gguf",
            "--gguf-type",
            "Q8_0",
            "-o",
            str(tmp_path / "g"),
        ],
    )
    assert result.exit_code == 2 and "--activations int8 writes compressed-tensors W8A8 for vLLM" in result.stderr
    result = runner.invoke(
        app,
        [
            "quantize",
            "-b",
            "8",
            "--activations",
            "int8",
            "--smoothing",
            "0.5",
            "--low-memory",
            "--no-eval",
            "-o",
            str(tmp_path / "l"),
        ],
    )
    assert (
        result.exit_code == 2
        and "--smoothing calibrates on the whole model in memory; drop --low-memory." in result.stderr
    )
    result = runner.invoke(
        app, ["quantize", "-b", "8", "-m", "bnb-int8", "--activations", "int8", "--no-eval", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "activations" in result.stderr
    assert not any((tmp_path / name).exists() for name in "glb")


def test_smoothing_refuses_a_model_without_llama_blocks(tiny_gpt2, tmp_path):
    with pytest.raises(InputError, match="smoothing knows Llama-style decoder blocks"):
        quantcli.quantize(
            QuantizeConfig(
                bits=8,
                method="rtn",
                model=tiny_gpt2,
                output=tmp_path / "q",
                eval=None,
                method_options={"activations": "int8", "smoothing": 0.5},
            )
        )


def test_streamed_w8a8_is_the_in_memory_checkpoint(w8a8, tmp_path):
    """--low-memory writes the same scheme block by block; its reload scores what the in-memory one does."""
    folder, _ = w8a8
    options = {"activations": "int8"}
    quantcli.quantize(
        QuantizeConfig(bits=8, method="rtn", output=tmp_path / "s", eval=None, low_memory=True, method_options=options)
    )
    streamed = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert streamed == json.loads((folder / "w8a8" / "config.json").read_text())["quantization_config"]["config_groups"]
    ours = quantcli.evaluate(str(tmp_path / "s"), EVAL, device="cpu")["perplexity"]
    assert ours == quantcli.evaluate(str(folder / "w8a8"), EVAL, device="cpu")["perplexity"]
