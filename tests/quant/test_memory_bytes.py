"""bytes_in_memory counts what a model holds: a tensor subclass (torchao, quanto) by the tensors it
wraps, not by its dense shape and dtype."""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor  # torch's reference wrapper subclass

from quantcli.checkpoint.load import load
from quantcli.quant.layers import bytes_in_memory
from quantcli.sources.models import EMBEDDED_MODEL


def test_wrapper_subclass_counts_the_tensors_it_holds_once_each():
    layer = torch.nn.Linear(64, 32)
    a, b = torch.randn(32, 64), torch.randn(32, 64)
    layer.weight = torch.nn.Parameter(TwoTensor(a, b), requires_grad=False)
    assert bytes_in_memory(layer) == a.nbytes + b.nbytes + layer.bias.nbytes
    layer.weight = torch.nn.Parameter(TwoTensor(a, a), requires_grad=False)  # one storage wrapped twice
    assert bytes_in_memory(layer) == a.nbytes + layer.bias.nbytes


def test_torchao_int8_weights_count_one_byte_per_weight_plus_scales():
    quantization = pytest.importorskip(
        "torchao.quantization", reason="torchao is a peer, installed only in the .peers side folder (make bench-peers)"
    )
    model = load(str(EMBEDDED_MODEL), "cpu")[0]
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for linear in linears:  # stories260K's are at least 64 wide: per-row scales add at most 1/8
        assert linear.weight.numel() <= bytes_in_memory(linear) <= 1.125 * linear.weight.numel()
