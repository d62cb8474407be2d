"""Reference ops: conventions, error bounds, and packing identical to compressed-tensors'."""

import pytest
import torch

from quantcli.quant import ops


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, group_size):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    scale, zero_point = ops.compute_qparams(weight, bits, symmetric, group_size)
    q = ops.quantize(weight, scale, zero_point, bits, group_size)
    qmin, qmax = ops.int_range(bits)
    assert q.dtype == torch.int8 and q.min() >= qmin and q.max() <= qmax
    restored = ops.dequantize(q, scale, zero_point, group_size)
    step = scale.repeat_interleave(group_size or 64, dim=1)
    # symmetric grids clip the largest positive value by up to one step (range is [-8, 7] * scale)
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert ((restored - weight).abs() <= bound).all()
    if symmetric:
        assert (zero_point == 0).all()


def test_eight_bit_is_much_finer_than_four_bit():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    err8 = (ops.fake_quantize(weight, 8, True, None) - weight).norm()
    err4 = (ops.fake_quantize(weight, 4, True, 32) - weight).norm()
    assert err8 * 8 < err4


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        ops.compute_qparams(torch.randn(4, 172), 4, True, 32)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_unpack_round_trip_and_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qmin, qmax = ops.int_range(bits)
    q = torch.randint(qmin, qmax + 1, (6, 172), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = ops.pack(q, bits)
    assert packed.shape == (6, -(-172 * bits // 32))
    assert torch.equal(ops.unpack(packed, bits, 172), q)
    assert torch.equal(packed, pack_to_int32(q, bits))  # the layout vLLM reads, bit for bit


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_never_loses_to_minmax(symmetric):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    error = {
        obs: (ops.fake_quantize(weight, 4, symmetric, 32, obs) - weight).abs().pow(2.4).reshape(16, 2, 32).sum(-1)
        for obs in ("minmax", "mse")
    }
    assert (error["mse"] <= error["minmax"] + 1e-6).all()
    assert error["mse"].sum() < 0.95 * error["minmax"].sum()
    with pytest.raises(ValueError, match="observer must be one of"):
        ops.compute_qparams(weight, 4, True, 32, "percentile")


@pytest.mark.parametrize("observer", ["minmax", "signed", "mse"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_scales_are_rounded_to_their_storage_dtype_before_the_integers_are_chosen(observer, scale_dtype):
    """The integers are the nearest ones for the 16-bit scale the checkpoint stores, so storing it
    loses nothing: every weight within half a step, or one step where the grid clips it (the
    positive end of a symmetric grid; mse clips on purpose)."""
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    scale, zero_point = ops.compute_qparams(weight, 4, True, 32, observer, scale_dtype)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.to(scale_dtype).float())
    q = ops.quantize(weight, scale, zero_point, 4, 32)
    assert torch.equal(q, ops.quantize(weight, scale.to(scale_dtype), zero_point, 4, 32))
    error = (ops.dequantize(q, scale, zero_point, 32) - weight).abs()
    step = scale.abs().repeat_interleave(32, dim=1)
    inside = (weight / scale.repeat_interleave(32, dim=1)).abs() < 7
    assert (error[inside] <= 0.5 * step[inside] + 1e-7).all()
    if observer != "mse":
        assert (error <= step + 1e-7).all()
    unrounded = ops.compute_qparams(weight, 4, True, 32, observer)[0]
    assert not torch.equal(unrounded, scale)  # fp32 scales differ: the rounding is real


def test_a_scale_that_rounds_to_zero_in_float16_becomes_one():
    weight = torch.full((2, 32), 1e-9)
    scale, _ = ops.compute_qparams(weight, 4, True, 32, "signed", torch.float16)
    assert torch.equal(scale, torch.ones_like(scale))
    assert (ops.quantize(weight, scale, torch.zeros(2, 1, dtype=torch.int8), 4, 32) == 0).all()
