"""The int8-cpu / int4-cpu backends: torch's weight-only kernels on the checkpoint's own integers
compute the dequantized model's function (up to bfloat16 activations), with packed weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantcli.checkpoint.load import load
from quantcli.config.quantize import EvalConfig
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import UnavailableError
from quantcli.measure.evaluation import measure_perplexity
from quantcli.progress import NullProgress
from quantcli.quant import ops
from quantcli.quant.cpu_kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear, _int4_module, _int8_module
from quantcli.quant.layers import bytes_in_memory, weight_matrix
from quantcli.run.pipeline import quantize
from tests.conftest import logits
from tests.support.models import SMOLLM2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    runs = {
        "w8": {"bits": 8},
        "w4": {"bits": 4},
        "w4-asym": {"bits": 4, "symmetric": False},
        "w4-channel": {"bits": 4, "group_size": -1},
    }
    for name, options in runs.items():
        quantize(config_from_mapping({"method": "rtn", "output": str(root / name), "eval": None, **options}))
    return root


def _implied_weight(layer) -> torch.Tensor:
    """The ``[out, in]`` weight a kernel layer multiplies by: its output for the identity matrix."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).t()


@pytest.mark.parametrize(
    "bits, symmetric, group_size", [(4, True, 32), (4, False, 64), (3, False, 128), (4, True, None), (4, False, None)]
)
def test_int4_scales_and_zeros_match_reference_dequantization(bits, symmetric, group_size):
    """quantcli's signed integers (zero point on the signed grid) map onto the kernel's unsigned
    ``(u - 8) * scale + zero`` form: the kernel's weight equals ops.dequantize up to bfloat16 rounding
    (2**-9 relative) of the scale, the zero, the weight it forms and the output: |u - 8| <= 8 and
    |zero| <= 8 scales, so at most 32 * 2**-9 = 1/16 of a scale (a quantization step)."""
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    scale, zero_point = ops.compute_qparams(weight, bits, symmetric, group_size)
    q = ops.quantize(weight, scale, zero_point, bits, group_size)
    reference = ops.dequantize(q, scale, zero_point, group_size)
    groups = scale.shape[1]
    steps = (q.int().reshape(48, groups, -1) - zero_point.int()[..., None]).reshape(48, 256)
    layer = _int4_module(steps, scale, None)
    assert isinstance(layer, Int4WeightOnlyLinear) and layer.group_size == (group_size or 256)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 48 * 256 // 2  # two weights per byte
    error = (_implied_weight(layer) - reference).abs().reshape(48, groups, -1)
    assert bool((error <= scale.float()[..., None] / 16).all())
    assert float((error / scale.float()[..., None]).mean()) < 1 / 128


def test_int8_applies_fp32_scales_outside_the_kernel():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    scale, zero_point = ops.compute_qparams(weight, 8, True, None)
    q = ops.quantize(weight, scale, zero_point, 8, None)
    layer = _int8_module(q.int(), scale, None)
    assert isinstance(layer, Int8WeightOnlyLinear) and layer.q.dtype == torch.int8
    torch.testing.assert_close(_implied_weight(layer), ops.dequantize(q, scale, zero_point, None), rtol=2**-8, atol=0)
    rows = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(rows), torch.cat([layer(row[None]) for row in rows]))  # decode = prefill rows


def test_refuses_what_the_kernels_cannot_run():
    steps = torch.zeros(64, 172, dtype=torch.int32)
    assert _int8_module(steps, torch.ones(64, 1), None) == "int8 kernel needs in_features divisible by 16, got 172"
    assert (
        _int8_module(torch.full((64, 64), 200), torch.ones(64, 1), None)
        == "int8 kernel has no zero point; this layer is asymmetric"
    )
    assert (
        _int4_module(steps, torch.ones(64, 4), None)
        == "int4 kernel takes groups of 32-256 dividing in_features, got groups of 43"
    )
    assert (
        _int4_module(torch.zeros(172, 64, dtype=torch.int32), torch.ones(172, 1), None)
        == "int4 kernel needs out_features divisible by 16, got 172"
    )


@pytest.mark.parametrize(
    "name, backend, swapped",
    [("w8", "int8-cpu", 30), ("w4", "int4-cpu", 20), ("w4-asym", "int4-cpu", 20), ("w4-channel", "int4-cpu", 20)],
)
def test_stories260K_logits_and_perplexity_match_dequantized(checkpoints, prompt_ids, name, backend, swapped):
    dense, tokenizer, _ = load(checkpoints / name, "cpu")
    fast, _, _ = load(checkpoints / name, "cpu", backend=backend)
    kernel_layers = [m for m in fast.modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))]
    assert len(kernel_layers) == swapped and len(fast.cpu_kernels_dense) == 35 - swapped
    stored = load_file(checkpoints / name / "model.safetensors")
    if backend == "int8-cpu":  # the checkpoint's own integers, not a re-quantization
        packed = stored["model.layers.0.self_attn.q_proj.weight_packed"]  # 8-bit weight-only: pack-quantized (W8A16)
        assert torch.equal(fast.model.layers[0].self_attn.q_proj.q, ops.unpack(packed, 8, 64))
    a, b = logits(dense, prompt_ids), logits(fast, prompt_ids)
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.93
    config = EvalConfig(max_tokens=2048, seq_len=128)
    ppl_dense = measure_perplexity(dense, tokenizer, config, NullProgress(), "dense").perplexity
    ppl_fast = measure_perplexity(fast, tokenizer, config, NullProgress(), "kernel").perplexity
    assert abs(ppl_fast / ppl_dense - 1) < 0.001
    assert bytes_in_memory(fast) < bytes_in_memory(dense)


def test_gpt2_conv1d_stored_dense_recovers_its_integers(tiny_gpt2, tmp_path, prompt_ids):
    """GPT-2's Conv1D layers are stored fake-quantized: the scales are recovered from the weights."""
    quantize(
        config_from_mapping(
            {"bits": 4, "method": "rtn", "model": tiny_gpt2, "output": str(tmp_path / "g"), "eval": None}
        )
    )
    dense, _, _ = load(tmp_path / "g", "cpu")
    fast, _, _ = load(tmp_path / "g", "cpu", backend="int4-cpu")
    assert fast.cpu_kernels_dense == {} and isinstance(fast.transformer.h[0].mlp.c_fc, Int4WeightOnlyLinear)
    a, b = logits(dense, prompt_ids), logits(fast, prompt_ids)
    assert (a - b).abs().max() < 0.02 * a.abs().max()


def test_refuses_wrong_checkpoints_before_loading_the_model(stories_path, checkpoints, tmp_path):
    with pytest.raises(UnavailableError, match="runs quantcli rtn/gptq checkpoints of 8 bits. Use backend='auto'."):
        load(stories_path, "cpu", backend="int8-cpu")
    metadata_only = tmp_path / "no-weights"  # the refusal comes from the metadata, before any weight is read
    metadata_only.mkdir()
    (metadata_only / "quantcli.json").write_text((checkpoints / "w4" / "quantcli.json").read_text())
    with pytest.raises(UnavailableError, match="This checkpoint is 4-bit: use backend='int4-cpu'."):
        load(metadata_only, "cpu", backend="int8-cpu")


@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason=f"SmolLM2 not at {SMOLLM2} (set QUANTCLI_SMOLLM2)")
@pytest.mark.parametrize("bits", [8, 4])
def test_smollm2_kernel_logits_match_dequantized(bits):
    """Every decoder layer of the real model through the kernel vs its rtn-dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    ids = tokenizer(
        "The history of the city begins in the Roman period, when a small fort was built on the river.",
        return_tensors="pt",
    ).input_ids
    modules = dict(model.named_modules())
    kernels = {}
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            weight = weight_matrix(module)
            group_size = None if bits == 8 else 64
            scale, zero_point = ops.compute_qparams(weight, bits, True, group_size)
            q = ops.quantize(weight, scale, zero_point, bits, group_size)
            module.weight.data = ops.dequantize(q, scale, zero_point, group_size)
            kernels[name] = (_int8_module if bits == 8 else _int4_module)(q.int(), scale, None)
    assert len(kernels) == 210 and not any(isinstance(k, str) for k in kernels.values())
    dequantized = logits(model, ids)
    for name, layer in kernels.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, layer)
    fast = logits(model, ids)
    assert (dequantized - fast).abs().max() < 0.02 * dequantized.abs().max()
    assert (dequantized.argmax(-1) == fast.argmax(-1)).float().mean() >= 0.95
