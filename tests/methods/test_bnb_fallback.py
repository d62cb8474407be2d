"""bitsandbytes' CPU 4-bit kernel (AVX512-BF16 CPUs) rejects widths its block does not divide.

On CPUs without AVX512-BF16 bnb takes its generic path, where every shape works; on CPUs with it
(bnb's own ``has_avx512bf16``) the kernel repacks weights at the first forward and fails for some
shapes. The tests that switch on that branch run its real packing code on either kind of CPU. The
probe must report that failure per shape and quantcli must not hide it.
"""

import pytest

import quantcli
from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import UnavailableError
from quantcli.methods.bnb import probe_4bit


@pytest.fixture
def avx512_kernel_branch(monkeypatch):
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    probe_4bit.cache_clear()
    yield
    probe_4bit.cache_clear()


def test_probe_matches_this_cpus_kernel():
    from bitsandbytes.functional import has_avx512bf16

    probe_4bit.cache_clear()
    verdicts = {shape: probe_4bit(*shape, "nf4", "float32", "cpu", False) for shape in [(64, 172), (172, 64), (64, 64)]}
    if has_avx512bf16():  # the kernel needs out % 32 == 0 and whole 64-wide blocks per row
        assert verdicts[(64, 172)] == "AssertionError: N must be divisible by block_n"
        assert verdicts[(172, 64)].startswith("RuntimeError: shape '[64, 2]' is invalid")
        assert verdicts[(64, 64)] is None
    else:
        assert verdicts == {(64, 172): None, (172, 64): None, (64, 64): None}


def test_probe_reports_the_kernel_errors(avx512_kernel_branch):
    assert probe_4bit(64, 172, "nf4", "float32", "cpu", False) == "AssertionError: N must be divisible by block_n"
    assert probe_4bit(172, 64, "fp4", "float32", "cpu", True).startswith("RuntimeError: shape '[64, 2]' is invalid")


def test_quantize_refuses_clearly_when_no_layer_can_run(avx512_kernel_branch, tmp_path):
    """stories260K's MLP widths (172) fail the kernel on every CPU; attention's 64x64 runs where it has AVX512-BF16."""
    with pytest.raises(
        UnavailableError, match=r"bitsandbytes bnb-nf4 fails for every selected layer on cpu .*Use method='rtn'"
    ):
        quantcli.quantize(
            QuantizeConfig(bits=4, method="bnb-nf4", output=tmp_path / "q", eval=None, skip_modules=("*.self_attn.*",))
        )
    assert not (tmp_path / "q").exists()


def test_failing_layers_are_kept_in_full_precision_and_reported(monkeypatch, tmp_path, prompt_ids):
    """Stand in for the AVX512 kernel's verdict with its documented rule (out % 32, in % 64);
    everything else (skip list, transformers' bnb load, save, plain reload) runs for real."""
    import torch
    from transformers import AutoModelForCausalLM

    import quantcli.methods.bnb as bnb_method
    from tests.conftest import logits

    def kernel_rule(in_features, out_features, *args):
        return (
            None
            if out_features % 32 == 0 and in_features % 64 == 0
            else "AssertionError: N must be divisible by block_n"
        )

    monkeypatch.setattr(bnb_method, "probe_4bit", kernel_rule)
    report = quantcli.quantize(QuantizeConfig(bits=4, method="bnb-nf4", output=tmp_path / "q", eval=None))
    kept = {name for name, layer in report.layers.items() if layer.note}
    assert kept == {f"model.layers.{i}.mlp.{p}" for i in range(5) for p in ("gate_proj", "up_proj", "down_proj")}
    gate = report.layers["model.layers.0.mlp.gate_proj"]
    assert gate.scheme == "float32" and "bitsandbytes 4-bit fails for 172x64 on cpu" in gate.note
    assert report.layers["model.layers.0.self_attn.q_proj"].scheme == "nf4"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert type(plain.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(plain, prompt_ids), logits(quantcli.load(tmp_path / "q")[0], prompt_ids))
