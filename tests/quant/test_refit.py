"""GPTQ's least-squares scale refit (``refit_scales``): exact on a constructed layer, never raises a row's
output error on real stories260K layers (integer grids and NF4), scales stored in their dtype."""

from __future__ import annotations

import pytest
import torch

from quantcli.methods import available_methods
from quantcli.quant import ops
from quantcli.quant.intgrid import IntLayout
from quantcli.quant.refit import output_error, refit_scales
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import EMBEDDED_MODEL, load_model, load_tokenizer

available_methods()  # fill the registry first: it skips discovery once any method module is imported
from quantcli.quant.gptq_solver import gptq_quantize  # noqa: E402

GATE, DOWN = "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj"


@pytest.fixture(scope="module")
def layers():
    """Real weights and Hessians ``2/n·XᵀX`` of two stories260K layers on TinyStories calibration windows."""
    tokenizer = load_tokenizer(str(EMBEDDED_MODEL))
    calibration = calibration_batch(read_documents("tinystories:calib"), tokenizer, 16, 128, 0)
    model = load_model(str(EMBEDDED_MODEL), torch.float32, "cpu")
    modules = dict(model.named_modules())
    seen = {}
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].reshape(-1, a[0].shape[-1])}))
        for n in (GATE, DOWN)
    ]
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: (modules[n].weight.data.clone(), 2 * seen[n].T @ seen[n] / seen[n].shape[0]) for n in (GATE, DOWN)}


def random_hessian(columns: int, seed: int) -> torch.Tensor:
    x = torch.randn(4 * columns, columns, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / x.shape[0]


def test_refit_recovers_the_scales_that_generated_the_weights():
    """Weights that are exactly integers times group scales: the refit finds those scales from perturbed ones."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (6, 64), generator=generator, dtype=torch.int8)
    true = torch.rand(6, 4, generator=generator) + 0.5
    weight = q.float() * true.repeat_interleave(16, dim=1)
    start = true * (1 + 0.2 * torch.rand(6, 4, generator=generator))
    hessian = random_hessian(64, 2)
    fitted, _, changed = refit_scales(
        weight, hessian, q, start, torch.zeros(6, 4, dtype=torch.int8), None, torch.float32
    )
    assert changed == 6
    torch.testing.assert_close(fitted, true, rtol=1e-4, atol=0)
    error = output_error(weight - q.float() * fitted.repeat_interleave(16, dim=1), hessian)
    assert float(error.max()) < 1e-6 * float(output_error(weight, hessian).min())


def test_asymmetric_refit_recovers_the_zero_points_too():
    generator = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (6, 64), generator=generator, dtype=torch.int8)
    true_scale = torch.rand(6, 4, generator=generator) + 0.5
    true_zero = torch.randint(-3, 4, (6, 4), generator=generator, dtype=torch.int8)
    weight = (q.float() - true_zero.float().repeat_interleave(16, dim=1)) * true_scale.repeat_interleave(16, dim=1)
    start = true_scale * (1 + 0.2 * torch.rand(6, 4, generator=generator))
    fitted, zero_point, changed = refit_scales(
        weight, random_hessian(64, 6), q, start, torch.zeros(6, 4, dtype=torch.int8), None, torch.float32, bits=4
    )
    assert changed == 6 and torch.equal(zero_point, true_zero)
    torch.testing.assert_close(fitted, true_scale, rtol=1e-4, atol=0)


def test_refit_rounds_to_the_storage_dtype_and_keeps_unused_groups():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 64, generator=generator)
    scale, zero_point = ops.compute_qparams(weight, 4, True, 32, "signed", torch.bfloat16)
    q = ops.quantize(weight, scale, zero_point, 4, 32)
    q[0, :32] = 0  # row 0's first group: every level 0, so its scale multiplies nothing
    fitted, _, _ = refit_scales(weight, random_hessian(64, 4), q, scale.float(), zero_point, None, torch.bfloat16)
    assert torch.equal(fitted, fitted.to(torch.bfloat16).float())
    assert fitted[0, 0] == scale[0, 0]
    assert not torch.equal(fitted, scale.float())


@pytest.mark.parametrize(
    "name, bits, group_size, act_order, symmetric, clip_search",
    [
        (GATE, 4, 32, True, True, True),
        (GATE, 3, 32, False, True, False),
        (GATE, 4, 32, True, False, True),
        (DOWN, 4, None, False, True, True),
        (DOWN, 4, 43, True, True, False),
    ],
)
def test_refit_never_raises_a_rows_output_error(layers, name, bits, group_size, act_order, symmetric, clip_search):
    weight, hessian = layers[name]
    layout = IntLayout(bits, symmetric, group_size, "signed" if symmetric else "minmax", "bfloat16")

    def row_errors(refit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        result, _ = gptq_quantize(weight, hessian, layout, act_order=act_order, clip_search=clip_search, refit=refit)
        assert torch.equal(result.scale, result.scale.to(torch.bfloat16).float())
        quantized = ops.dequantize(result.q, result.scale, result.zero_point, group_size)
        return output_error(weight - quantized, hessian), result.q

    (plain, q_plain), (refit, q_refit) = row_errors(False), row_errors(True)
    assert torch.equal(q_plain, q_refit)  # the integers GPTQ chose stay; only their scales move
    assert bool((refit <= plain).all())
    assert refit.sum() < plain.sum()


def test_refit_on_the_nf4_codebook(layers):
    weight, hessian = layers[GATE]
    codebook = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
                             0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])  # fmt: skip
    layout = IntLayout(4, True, 64)
    errors = []
    for refit in (False, True):
        result, _ = gptq_quantize(weight, hessian, layout, act_order=True, codebook=codebook, refit=refit)
        values = ops.dequantize_codebook(result.q, result.scale.repeat_interleave(64, dim=1), codebook)
        errors.append(output_error(weight - values, hessian))
    assert bool((errors[1] <= errors[0]).all()) and errors[1].sum() < errors[0].sum()
