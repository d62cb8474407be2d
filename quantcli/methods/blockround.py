"""``blockround``: GPTQ, then each decoder block's rounding tuned together to reproduce the full-precision block;
``blockround-nf4``: the same on ``gptq-nf4``'s bitsandbytes NF4 grid.

GPTQ chooses every layer's codes one layer at a time, each against its own output. Once a block's layers
are done, :func:`quantcli.quant.round_tuning.tune_block` lets each code move one step on the layer's fixed
grid, by signed gradient descent on the block's output error against the original block's outputs on the
full-precision stream (the driver carries both streams, :class:`quantcli.quant.reference.Reference`),
and keeps the result only where the error on all calibration windows drops. Scales are GPTQ's (its clip
search included), so the grid is whatever the run writes: compressed-tensors integer groups (any width,
symmetric or not), with ``--format gguf`` the GGUF type's own blocks with llama.cpp's scales, or NF4 codes
with bitsandbytes' absmax. Every option of gptq (gptq-nf4) applies (``target: full-precision`` composes:
GPTAQ then tuning); streams and resumes as gptq does. Cost: ``iterations`` forward and backward passes of
one block on one calibration mini-batch (``batch`` windows), plus three forward passes over all of them, per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from quantcli.errors import InputError, option
from quantcli.formats.bitsandbytes import BLOCK, NF4Weights
from quantcli.methods import register_method
from quantcli.methods.gptq import GPTQConfig, GPTQQuantizer
from quantcli.methods.gptq_nf4 import GPTQNF4Config, GPTQNF4Quantizer
from quantcli.quant import ops
from quantcli.quant.intgrid import IntWeights
from quantcli.quant.layers import is_conv1d, set_weight_matrix
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.quant.reference import Inputs, Reference
from quantcli.quant.round_tuning import TunableLayer, tune_block

# the codes tuning may start from; SmolLM2's first 4 blocks at W3 g64, 200 steps with scales, summed block error:
# from rtn 0.455, gptq 0.476, rtn with clip search and refit (weight error) 0.485; 16 steps: gptq 0.569, rtn 1.507
STARTS = ("gptq", "rtn")


@dataclass(frozen=True)
class Tuning:
    """The tuning's options: ``iterations`` signed-gradient steps per block (0: plain GPTQ), the starting
    ``learning_rate`` in code steps (decaying linearly to zero; None: ``1 / iterations``, AutoRound's rule),
    the ``seed`` that orders the calibration mini-batches, ``batch``: calibration windows per step (the run's
    forward passes take them in mini-batches of that size too), ``scales``: on integer grids, tune one factor
    per group on the scales too (AutoRound's min/max tuning; GGUF and NF4 grids keep their scales), and
    ``start``: the codes tuning starts from, GPTQ's (``gptq``) or round-to-nearest's (``rtn``, as AutoRound
    starts: GPTQ on a zero Hessian, so a GGUF grid gets llama.cpp's scales without an imatrix; GPTQ's codes
    are solved too, and a block whose tuning ends above their error keeps them). GPTQ's codes are the better
    start for a short tuning, round-to-nearest's for a long one (the measurements beside :data:`STARTS`)."""

    iterations: int = 32  # 32 steps of 4 windows cost what 16 of 8 did and tune better (docs/METHODS.md)
    learning_rate: float | None = None
    seed: int = 0
    batch: int = 4
    scales: bool = False
    start: str = "gptq"

    def check_tuning(self) -> None:
        if self.start not in STARTS:
            raise InputError(f"blockround start must be one of {', '.join(STARTS)}, got {self.start!r}.")
        if self.start == "rtn" and getattr(self, "target", None) == "full-precision":
            raise InputError(
                "blockround start rtn rounds each layer to nearest, so GPTQ's target is not used: drop the method "
                "option target, or use the method option start=gptq."
            )
        if self.start == "rtn" and getattr(self, "importance", None):
            raise InputError(
                "blockround start rtn takes llama.cpp's scales without an imatrix: drop the method option "
                "importance, or use the method option start=gptq."
            )
        if self.iterations < 0:
            raise InputError(
                f"blockround iterations must be 0 or more steps per block, got {self.iterations}. Use e.g. 32."
            )
        if self.batch < 1:
            raise InputError(f"blockround batch must be 1 or more calibration windows per step, got {self.batch}.")
        if self.learning_rate is not None and not 0 < self.learning_rate <= 1:
            raise InputError(
                f"blockround learning_rate must be above 0 and at most 1 (code steps), got {self.learning_rate}. "
                "Use e.g. 0.0625."
            )


@dataclass(frozen=True)
class BlockRoundConfig(Tuning, GPTQConfig):
    """GPTQ's options plus :class:`Tuning`'s; ``clip_search`` and ``refit_scales`` (None) are on from GPTQ's
    start and off from round-to-nearest's, AutoRound's start (given, they fit each layer's weights then)."""

    clip_search: bool | None = None
    refit_scales: bool | None = None

    def __post_init__(self) -> None:
        for name in ("clip_search", "refit_scales"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.start != "rtn")
        super().__post_init__()
        self.check_tuning()


@dataclass(frozen=True)
class BlockRoundNF4Config(Tuning, GPTQNF4Config):
    """gptq-nf4's options plus :class:`Tuning`'s (``scales`` refused: bitsandbytes computes NF4's absmax)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_tuning()
        if self.scales:
            raise InputError(
                "blockround-nf4 cannot tune scales: bitsandbytes computes NF4's absmax itself. Use"
                f" {option('method', 'blockround')} to tune integer groups' scales, or drop the method option scales."
            )


def _nf4_values(record: NF4Weights) -> torch.Tensor:
    import bitsandbytes.functional as F

    codebook = F.get_4bit_type("nf4", device="cpu").to(record.codes.device)
    blocks = codebook[record.codes.long()].reshape(-1, BLOCK) * record.absmax.float().reshape(-1, 1)
    return blocks.reshape(record.codes.shape)


def _with_codes(record: Any, codes: torch.Tensor) -> Any:
    """The record with other codes, everything the format stores from the scales unchanged."""
    if isinstance(record, IntWeights):
        return replace(record, q=codes.to(torch.int8))
    return replace(record, codes=codes.to(torch.uint8 if isinstance(record, NF4Weights) else torch.int8))


def _scaled(record: IntWeights, codes: torch.Tensor, factors: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """An integer layer's fp32 values with its scales times ``factors``, rounded as the format stores them."""
    scale = _rescaled(record, factors, stored)
    return ops.dequantize(codes, scale, record.zero_point, record.layout.group_size).float()


def _rescaled(record: IntWeights, factors: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The record's scales times ``factors``, rounded to the ``stored`` dtype, held in the record's."""
    return (record.scale.float() * factors).to(stored).to(record.scale.dtype)


def _stored_scale_dtype(record: Any, module: torch.nn.Module) -> torch.dtype:
    return record.layout.scale_dtype_for(module.weight.dtype)


def _grid(record: Any) -> tuple[torch.Tensor, int, int]:
    """A record's codes (float) and their range."""
    if isinstance(record, IntWeights):
        return record.q.float(), *ops.int_range(record.layout.bits)
    if isinstance(record, NF4Weights):
        return record.codes.float(), 0, 15
    return record.codes.float(), record.type.lowest, record.type.highest


def _values(record: Any) -> torch.Tensor:
    """The fp32 ``[out, in]`` weights the format's runtime computes with."""
    if isinstance(record, IntWeights):
        return ops.dequantize(record.q, record.scale, record.zero_point, record.layout.group_size).float()
    return _nf4_values(record) if isinstance(record, NF4Weights) else record.dequantize().float()


def _tunable(record: Any) -> bool:
    """NF4 layers whose blocks span rows keep bitsandbytes' own rounding, as gptq-nf4 leaves them."""
    return record is not None and not (isinstance(record, NF4Weights) and record.codes.shape[1] % BLOCK)


def _tunable_layer(parameter: str, module: torch.nn.Module, record: Any, original: torch.Tensor) -> TunableLayer:
    """One layer of a block as :func:`tune_block` sees it; integer layers can rescale their groups."""
    scaled = isinstance(record, IntWeights)
    return TunableLayer(
        parameter,
        *_grid(record),
        lambda codes: _values(_with_codes(record, codes)),
        original,
        is_conv1d(module),
        module.weight.dtype,
        (lambda codes, factors: _scaled(record, codes, factors, _stored_scale_dtype(record, module)))
        if scaled
        else None,
        tuple(record.scale.shape) if scaled else (),
    )


def tuning_reference(
    request: QuantizeRequest, errors: list[tuple[float, float, bool]], fallbacks: dict[str, Any]
) -> Reference:
    """The full-precision stream with the per-block tuning step; each block's error before and after, and
    whether it kept ``fallbacks``' records (GPTQ's, by layer name, with ``start: rtn``), go to ``errors``."""
    config = request.config
    modules = {module: name for name, module in request.model.named_modules()}

    def refine(
        block: torch.nn.Module, records: dict[str, Any], inputs: Inputs, targets: list
    ) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
        gptqs = dict(fallbacks)  # GPTQ's records of this block's layers (start: rtn); the next block's start empty
        fallbacks.clear()
        inside = {
            modules[module]: (f"{name}.weight", module)
            for name, module in block.named_modules()
            if modules.get(module) in records and _tunable(records[modules[module]])
        }
        if not inside or not config.iterations:
            return records, None

        def tunable(source: dict[str, Any]) -> list[TunableLayer]:
            return [
                _tunable_layer(parameter, module, source[name], reference.originals[name])
                for name, (parameter, module) in inside.items()
            ]

        fallback = tunable(gptqs) if all(name in gptqs for name in inside) else None
        rate = config.learning_rate or 1 / config.iterations
        tuned = tune_block(
            block, tunable(records), inputs, targets, config.iterations, rate, config.seed, config.scales, fallback
        )
        errors.append((tuned.start_error, tuned.error, tuned.fell_back))
        for name, (parameter, module) in inside.items():
            record = gptqs[name] if tuned.fell_back else records[name]
            records[name] = _with_codes(record, tuned.codes[parameter])
            if tuned.factors[parameter] is not None:
                stored = _stored_scale_dtype(records[name], module)
                records[name] = replace(records[name], scale=_rescaled(records[name], tuned.factors[parameter], stored))
            set_weight_matrix(module, _values(records[name]).to(module.weight.dtype))
        return records, tuned.outputs

    asymmetric = getattr(config, "target", None) == "full-precision"
    reference = Reference(asymmetric=asymmetric, refine=refine, batch=config.batch)  # refine reads its originals
    return reference


def solve_start(
    config: Any, fallbacks: dict[str, Any], name: str, solve: Callable, hessian: torch.Tensor, cross: object
) -> tuple:
    """GPTQ's codes, or with ``start: rtn`` round-to-nearest's (a zero Hessian, no GPTAQ term), GPTQ's kept
    in ``fallbacks`` for a block whose tuning from them does not get below GPTQ's error."""
    if config.start != "rtn":
        return solve(hessian, cross)
    if config.iterations:  # without tuning there is nothing to fall back from
        fallbacks[name] = solve(hessian, cross)[0]
    return solve(torch.zeros_like(hessian), None)


def _with_errors(result: QuantizedModel, errors: list[tuple[float, float, bool]], config: Any) -> QuantizedModel:
    """The run's summed block output errors (at the starting codes, tuned) and the blocks that kept GPTQ's codes
    (``start: rtn``) in its stats, the tuning's options in its options."""
    if errors:
        start, tuned = (sum(one[i] for one in errors) for i in (0, 1))
        result.stats["block_output_error"] = {"start": start, "tuned": tuned, "blocks": len(errors)}
        if config.start == "rtn":
            result.stats["block_output_error"]["kept_gptq"] = [i for i, one in enumerate(errors) if one[2]]
    result.options.update(
        iterations=config.iterations,
        learning_rate=config.learning_rate,
        seed=config.seed,
        batch=config.batch,
        scales=config.scales,
        start=config.start,
    )
    return result


class _TuningSteps:
    """What blockround adds to its GPTQ base class: the start's solve, the per-block tuning step, its stats."""

    def quantize(self, request: QuantizeRequest) -> QuantizedModel:
        self._errors: list[tuple[float, float, bool]] = []
        self._fallbacks: dict[str, Any] = {}
        return _with_errors(super().quantize(request), self._errors, request.config)

    def reference(self, request: QuantizeRequest) -> Reference:
        return tuning_reference(request, self._errors, self._fallbacks)

    def solve(self, config: Any, name: str, solve: Callable, hessian: torch.Tensor, cross: object) -> tuple:
        return solve_start(config, self._fallbacks, name, solve, hessian, cross)


@register_method
class BlockRoundQuantizer(_TuningSteps, GPTQQuantizer):
    name = "blockround"
    summary = (
        "GPTQ, then each decoder block's rounding tuned by signed gradient descent to reproduce the"
        " full-precision block (integer groups or GGUF block grids)"
    )
    config_class = BlockRoundConfig
    default_for = ()
    allocates = False  # the per-layer precision search scores gptq's candidates, not tuned blocks


@register_method
class BlockRoundNF4Quantizer(_TuningSteps, GPTQNF4Quantizer):
    name = "blockround-nf4"
    summary = "gptq-nf4, then each decoder block's NF4 codes tuned as blockround does; bitsandbytes checkpoint"
    config_class = BlockRoundNF4Config
