"""The full-precision stream beside the quantized one, for methods whose target is the original model's
(:func:`quantcli.quant.blockwise.quantize_blockwise` with a :class:`Reference`).

Each decoder block is run twice on the calibration windows: with its original weights on the
full-precision model's hidden states (before any of its layers is quantized), and with its quantized
weights on the quantized model's. Both streams are alive at once, so the calibration activations take
twice the memory of plain GPTQ. The full-precision pass gives:

- ``targets``: the original block's outputs, which a per-block step (``refine``) tries to reproduce
  with the quantized block run on the quantized stream, and which become the next block's
  full-precision inputs;
- with ``asymmetric`` (GPTAQ, Li et al. 2025), every layer's full-precision input ``X̃`` per
  mini-batch, kept for the block (layers that share an input share one tensor), from which the
  driver collects ``2/n·(X̃ - X)ᵀX`` beside each Hessian ``2/n·XᵀX`` of the quantized inputs ``X``.

A streamed run saves both streams' hidden states after each block, so ``--resume`` continues either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quantcli.errors import UnavailableError
from quantcli.quant.layers import weight_matrix
from quantcli.quant.moe import is_expert_layer

Inputs = list[tuple[torch.Tensor, tuple, dict]]  # per mini-batch: hidden states, other args, kwargs
Refine = Callable[
    [torch.nn.Module, dict[str, Any], Inputs, list[torch.Tensor]], tuple[dict[str, Any], list[torch.Tensor] | None]
]


@dataclass
class Reference:
    """What a method asks of the full-precision stream: ``asymmetric`` layer inputs for GPTAQ and/or a
    per-block ``refine(block, records, inputs, targets) -> (records, outputs)`` run once the block's layers
    are quantized (``inputs``: the quantized stream's, ``targets``: the original block's outputs; the
    layers' original weights in ``originals`` meanwhile; ``outputs``: the block's outputs on ``inputs`` as
    it leaves the block, if it computed them, else None), and the calibration windows per mini-batch it
    wants (``batch``; None: the driver's)."""

    asymmetric: bool = False
    refine: Refine | None = None
    batch: int | None = None
    hidden: list[torch.Tensor] = field(default_factory=list)  # the full-precision stream's block inputs
    layer_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per layer, per mini-batch
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # with refine: the block's original weights

    def start(self, inputs: Inputs, names: tuple[str, ...], saved: list[torch.Tensor] | None) -> None:
        """Begin at the first block's inputs, or at the full-precision half of a resumed run's ``saved``."""
        if self.asymmetric and any(is_expert_layer(name) for name in names):
            raise UnavailableError(
                "the full-precision target (GPTAQ) pairs each layer's inputs token by token, which routed experts "
                "do not keep. Use the method option target 'quantized' on a mixture-of-experts model."
            )
        count = len(inputs)
        self.hidden = list(saved[count:]) if saved is not None else [hidden.clone() for hidden, _, _ in inputs]

    def run_original(self, block: torch.nn.Module, layers: dict[str, Any], inputs: Inputs) -> list[torch.Tensor]:
        """The block's outputs on the full-precision stream (its weights still the original ones),
        each layer's inputs kept when ``asymmetric``, its layers' weights when there is a per-block step."""
        self.layer_inputs = {name: [] for name in layers} if self.asymmetric else {}
        if self.refine is not None:
            self.originals = {name: weight_matrix(module).detach().float().clone() for name, module in layers.items()}

        def hook_for(name: str) -> Any:
            def hook(module: Any, args: tuple) -> None:
                self.layer_inputs[name].append(args[0].detach())

            return hook

        hooked = layers.items() if self.asymmetric else ()
        handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in hooked]
        try:
            outputs = [
                block(hidden, *args, **kwargs) for hidden, (_, args, kwargs) in zip(self.hidden, inputs, strict=True)
            ]
        finally:
            for handle in handles:
                handle.remove()
        return [out[0] if isinstance(out, tuple) else out for out in outputs]

    def finish(
        self, block: torch.nn.Module, records: dict[str, Any], inputs: Inputs, targets: list[torch.Tensor]
    ) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
        """The block's records after the per-block step, and its outputs if the step computed them; the
        targets become the next block's full-precision inputs."""
        self.layer_inputs, outputs = {}, None
        if self.refine is not None:
            records, outputs = self.refine(block, records, inputs, targets)
            self.originals = {}
        self.hidden = targets
        return records, outputs


def cross_term(cross: torch.Tensor, original: torch.Tensor, quantized: torch.Tensor, seen: int, new: int) -> None:
    """Fold one mini-batch into the running mean ``2/n·(X̃ - X)ᵀX`` (as the Hessian's running mean)."""
    if original.shape != quantized.shape:
        raise UnavailableError(
            f"the full-precision inputs of a layer ({tuple(original.shape)}) do not pair with its quantized ones "
            f"({tuple(quantized.shape)}). Use the method option target 'quantized'."
        )
    x = quantized.reshape(-1, quantized.shape[-1]).float()
    difference = original.reshape(-1, original.shape[-1]).float() - x
    cross.mul_((seen - new) / seen).addmm_(difference.t(), x, alpha=2 / seen)
