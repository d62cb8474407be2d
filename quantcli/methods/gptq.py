"""GPTQ (Frantar et al., 2022): calibrated 3/4/8-bit integer weights in pure PyTorch (CPU and CUDA);
the per-layer solver is :mod:`quantcli.quant.gptq_solver`.

Sequential and memory-bounded (:mod:`quantcli.quant.blockwise`): one decoder block at a time, each layer's
Hessian taken on the outputs of the blocks and layers already quantized. The group rule is
:func:`plan_layouts`' (172-wide layers get groups of 43). Layers no calibration pass reaches fall
back to round-to-nearest, with a note.

The input embedding (and an untied output head, ``QuantizeRequest.tables``) is rounded to nearest
(int8 in groups of 32 by default): an embedding's inputs are one-hot token ids, so ``XᵀX`` is
diagonal (token counts) and GPTQ could only reweight rows it never couples; the head's Hessian (the
final norm's outputs) is not collected by the block driver. A tied tensor could use the head's
Hessian; not tried.

With ``--format gguf`` GPTQ chooses the codes of the GGUF type's own block grid (:meth:`GPTQQuantizer._on_grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quantcli.errors import InputError, option
from quantcli.formats.compressed_tensors.writer import compressed_result
from quantcli.formats.gguf.types import fixed_grid
from quantcli.formats.gguf.writer import quantize_on_grid
from quantcli.methods import register_method
from quantcli.methods.base import Quantizer
from quantcli.methods.rtn import round_to_nearest
from quantcli.quant import ops
from quantcli.quant.awq import awq_step
from quantcli.quant.blockwise import quantize_blockwise
from quantcli.quant.gptq_solver import gptq_on_grid, gptq_quantize
from quantcli.quant.intgrid import TABLE_NOTE, IntGridConfig, IntWeights, request_layouts
from quantcli.quant.layers import set_weight_matrix, weight_matrix
from quantcli.quant.moe import calibration_rule
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.quant.reference import Reference

TARGETS = ("quantized", "full-precision")  # each layer's target: GPTQ's, or GPTAQ's full-precision outputs


@dataclass(frozen=True)
class GPTQConfig(IntGridConfig):
    """The shared integer grid plus ``damp``: fraction of the mean of ``diag(H)`` added to it;
    ``block_size``: columns per lazy update; ``clip_search``: pick each row's range by its output
    error after GPTQ (see :func:`gptq_quantize`); ``importance``: with ``--format gguf``, each block's scales
    from llama.cpp's imatrix search steered by the layer's ``diag(H)`` (:meth:`GPTQQuantizer._on_grid`; None:
    on for GGUF, the only grid it applies to: SmolLM2 Q4_0 +8.80% against +11.76% without, held-out protocol);
    ``refit_scales``: refit each row's scales by least squares on the Hessian once its integers are fixed
    (:mod:`quantcli.quant.refit`); ``awq``: scale each input channel by AWQ's search before the block's
    layers are quantized (:mod:`quantcli.quant.awq`); ``target``: whose output each layer matches, the
    ``quantized`` model's inputs' (GPTQ) or the ``full-precision`` model's (GPTAQ, :mod:`quantcli.quant.gptaq`)."""

    act_order: bool = True
    clip_search: bool = True
    damp: float = 0.01
    block_size: int = 128
    importance: bool | None = None
    refit_scales: bool = True  # benchmarks/results/smollm2/gptq-variants.md: +14.54% against +16.55% at W4 g128
    awq: bool = False
    target: str = "quantized"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise InputError(
                f"gptq damp must be between 0 and 1 (a fraction of the mean Hessian diagonal), got {self.damp}. Use "
                "e.g. 0.01."
            )
        if self.target not in TARGETS:
            raise InputError(f"gptq target must be one of {', '.join(TARGETS)}, got {self.target!r}.")
        if self.block_size <= 0:
            raise InputError(
                f"gptq block_size must be a positive number of columns, got {self.block_size}. Use e.g. 128."
            )


@register_method
class GPTQQuantizer(Quantizer):
    name = "gptq"
    summary = (
        "GPTQ, calibrated block by block, pure PyTorch (INT8/INT4/INT3, groups, act-order, clip search; options"
        " awq, refit_scales); compressed-tensors output"
    )
    supported_bits = (8, 4, 3)
    config_class = GPTQConfig
    needs_calibration = True
    quantizes_tables = True
    output_format = "compressed-tensors"
    block_grids = True
    streams = True
    allocates = True
    default_for = ((3, "any"),)
    run_options = ("embeddings", "keep_dtype")

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        config, model = request.config, request.model
        if request.calibration is None:
            raise InputError("gptq needs calibration data: pass calibration token windows in the request.")
        modules = dict(model.named_modules())
        if request.grid is not None:
            return self._on_grid(request)
        if config.importance:
            raise InputError(
                f"{option('importance', True)} steers the scale search of a GGUF block type; add"
                f" {option('format', 'gguf')}, or drop {option('importance', True)}."
            )

        plan = request_layouts(request)
        notes: dict[str, list[str]] = {name: [] for name in plan}

        def finish(name: str, hessian: torch.Tensor | None, cross: torch.Tensor | None = None) -> IntWeights:
            layout, module, matrix = plan[name], modules[name], weight_matrix(modules[name])
            if name in request.tables:  # one-hot inputs: no Hessian worth the name (see the module docstring)
                unit = "row" if layout.group_size is None else f"group of {layout.group_size}"
                notes[name].append(TABLE_NOTE.format(unit=unit))
                layer = round_to_nearest(matrix, layout)
                set_weight_matrix(module, ops.dequantize(layer.q, layer.scale, layer.zero_point, layout.group_size))
                request.progress(1)
                return layer
            under = calibration_rule(name, tokens, matrix.shape[1])
            if hessian is None or under:  # zero Hessian: every input unseen, so GPTQ rounds to nearest
                unreached = "round-to-nearest: no calibration pass through the decoder blocks reaches it"
                notes[name].append(under or unreached)
                hessian = torch.zeros(matrix.shape[1], matrix.shape[1], device=matrix.device)
            layer, extra = self.solve(
                config,
                name,
                lambda hessian, cross: gptq_quantize(
                    matrix,
                    hessian,
                    layout,
                    config.damp,
                    config.block_size,
                    config.act_order,
                    clip_search=config.clip_search,
                    refit=config.refit_scales,
                    cross=cross,
                ),
                hessian,
                cross,
            )
            notes[name].extend(extra)
            set_weight_matrix(module, ops.dequantize(layer.q, layer.scale, layer.zero_point, layout.group_size))
            request.progress(1)
            return layer

        blocks = request.block_source(tuple(plan))
        tokens: dict[str, int] = {}
        prepare = awq_step(model, plan, notes) if config.awq else None
        stats = quantize_blockwise(
            blocks, tuple(plan), request.calibration, finish, tokens, prepare, self.reference(request)
        )
        rounded = sum(1 for name in plan if calibration_rule(name, tokens, weight_matrix(modules[name]).shape[1]))
        if "tokens_per_expert" in stats:
            stats["experts_rounded_to_nearest"] = rounded
        options = {key: value for key, value in asdict(config).items() if key not in ("bits", "importance")}
        return compressed_result(model, self.name, config.bits, options, blocks.records, notes, stats)

    def _on_grid(self, request: QuantizeRequest) -> QuantizedModel:
        """GPTQ choosing the codes of the request's GGUF block type, its scales llama.cpp's reference
        ones from the original weights, each row's range shrunk where the clip search finds it better
        (``--no-clip-search``: exactly the reference scales). With ``importance`` the scales are llama.cpp's
        imatrix search's with ``diag(H)`` (each input's mean square, doubled) as the imatrix; an input no
        calibration token reached gets the mean of the others, so its blocks keep a scale."""

        config = request.config

        def choose(matrix: torch.Tensor, hessian: torch.Tensor, kind: object, name: str, cross: object = None) -> tuple:
            def solve(hessian: torch.Tensor, cross: object) -> tuple:
                diagonal = torch.diagonal(hessian).float()
                seen = diagonal > 0
                importance = None
                if config.importance is not False and seen.any():
                    importance = torch.where(seen, diagonal, diagonal[seen].mean())
                return gptq_on_grid(
                    matrix,
                    hessian,
                    lambda scaled: fixed_grid(scaled, kind, importance),
                    config.damp,
                    config.block_size,
                    config.act_order,
                    config.clip_search,
                    cross,
                )

            return self.solve(config, name, solve, hessian, cross)

        options = {
            "gguf_type": request.grid.name,
            "act_order": config.act_order,
            "clip_search": config.clip_search,
            "importance": config.importance is not False,
            "damp": config.damp,
            "block_size": config.block_size,
            "target": config.target,
        }
        return quantize_on_grid(request, self.name, options, choose, self.reference(request))

    def solve(self, config: Any, name: str, solve: Callable, hessian: torch.Tensor, cross: object) -> tuple:
        """Layer ``name``'s ``(record, notes)`` from ``solve(hessian, cross)``: GPTQ on the calibration's
        Hessian (and GPTAQ's term); blockround's ``start: rtn`` solves on a zero Hessian as well."""
        return solve(hessian, cross)

    def reference(self, request: QuantizeRequest) -> Reference | None:
        """The full-precision stream this run needs beside the quantized one (GPTAQ's), or None."""
        return Reference(asymmetric=True) if request.config.target == "full-precision" else None
