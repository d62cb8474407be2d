"""The block driver: every method quantizes layers one decoder block at a time, in run order.

A block source hands out the blocks: :class:`ModelBlocks` for a model in memory, or
:class:`quantcli.run.streaming.ShardBlocks`, which reads each block from the safetensors shards and
writes it out when done (``--low-memory``). Calibrated methods get each layer's Hessian:

The inputs of the first decoder block (the ``ModuleList`` with the most parameters that holds the
selected layers) are captured for every calibration sample; then each block in turn is quantized
and run once more with its quantized weights to make the next block's inputs, so only one block's
activations are alive. Within a block, layers are done in the order they run, grouped by shared
input (q/k/v, o, gate/up, down): each group's Hessians ``2/n·XᵀX`` are collected by re-running the
block with the earlier groups already quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from quantcli.errors import UnavailableError, option
from quantcli.quant.layers import weight_matrix
from quantcli.quant.moe import merge_expert_groups, tokens_per_expert
from quantcli.quant.reference import Inputs, Reference, cross_term

BATCH = 8  # calibration samples per forward pass, unless a reference asks for its own


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def decoder_blocks(model: Any, names: tuple[str, ...]) -> tuple[str, torch.nn.ModuleList]:
    """The ``ModuleList`` with the most parameters among those holding selected layers (empty if none)."""
    found = [
        (sum(p.numel() for p in module.parameters()), prefix, module)
        for prefix, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and any(n.startswith(prefix + ".") for n in names)
    ]
    if not found:  # every layer is then quantized on its own, without calibration
        return "", torch.nn.ModuleList()
    _, prefix, blocks = max(found, key=lambda item: item[0])
    return prefix, blocks


def _first_block_inputs(model: Any, block: torch.nn.Module, calibration: torch.Tensor, batch: int) -> Inputs:
    """What the model feeds ``block`` for each mini-batch of ``batch`` calibration windows."""
    captured: Inputs = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for windows in calibration.split(batch):
            try:
                model(input_ids=windows.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run(block: torch.nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    outputs = [block(hidden, *args, **kwargs) for hidden, args, kwargs in inputs]
    return [out[0] if isinstance(out, tuple) else out for out in outputs]


def _groups_in_run_order(block: torch.nn.Module, layers: dict[str, Any], inputs: Inputs) -> list[list[str]]:
    """``layers`` in the order the block calls them, consecutive calls on one input tensor grouped."""
    groups: list[list[str]] = []
    last: list[Any] = [None]

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple) -> None:
            if any(name in group for group in groups):
                return
            if args[0] is last[0]:
                groups[-1].append(name)
            else:
                groups.append([name])
                last[0] = args[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:  # mini-batches until every layer ran once (an expert may get no token of the first one)
        for one in inputs:
            _run(block, [one])
            if sum(map(len, groups)) == len(layers):
                break
    finally:
        for handle in handles:
            handle.remove()
    return groups


def _hessians(
    block: torch.nn.Module,
    layers: dict[str, Any],
    inputs: Inputs,
    tokens: dict[str, int],
    original: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``2/n·XᵀX`` (float32, running mean) of each layer's inputs over all calibration tokens; how many
    tokens each layer saw goes into ``tokens`` (an expert sees only the tokens routed to it). With the
    layers' full-precision inputs per mini-batch (``original``, :class:`Reference`), also ``2/n·(X̃ - X)ᵀX``.

    ``layers`` are in run order; each pass stops once the last of them has seen its input.
    """
    shapes = {name: (weight_matrix(m).shape[1],) * 2 for name, m in layers.items()}
    hessians = {name: torch.zeros(shapes[name], device=m.weight.device) for name, m in layers.items()}
    crosses = {name: torch.zeros_like(hessians[name]) for name in layers} if original is not None else {}
    counts, calls = dict.fromkeys(layers, 0), dict.fromkeys(layers, 0)

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            seen = counts[name] = counts[name] + x.shape[0]
            hessians[name].mul_((seen - x.shape[0]) / seen).addmm_(x.t(), x, alpha=2 / seen)
            if original is not None:
                cross_term(crosses[name], original[name][calls[name]], args[0].detach(), seen, x.shape[0])
            calls[name] += 1
            if name == last:
                raise _Stop

        return hook

    last = list(layers)[-1]
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:
        for one in inputs:
            try:
                _run(block, [one])
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    tokens.update(counts)
    return {name: (hessian, crosses[name]) if crosses else (hessian,) for name, hessian in hessians.items()}


def _device(model: Any) -> torch.device:
    """Where the model's loaded weights are (a streaming skeleton keeps the rest on ``meta``)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


class ModelBlocks:
    """The block source of a model already in memory: blocks are used in place, records kept."""

    def __init__(self, model: Any, names: tuple[str, ...]) -> None:
        self.model = model
        self.prefix, self.blocks = decoder_blocks(model, names)
        self.records: dict[str, Any] = {}

    def resume_point(self) -> tuple[int, list[torch.Tensor] | None]:
        """The first block to quantize and, past block 0, its saved input hidden states."""
        return 0, None

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[Any]:
        """The model, able to run up to the first block (a streaming source loads what that needs)."""
        yield self.model

    def open(self, index: int) -> torch.nn.Module:
        return self.blocks[index]

    def close(self, index: int, records: dict[str, Any], hidden: list[torch.Tensor] | None) -> None:
        """Block ``index`` is quantized; ``hidden`` are the next block's inputs (None without calibration)."""
        self.records.update(records)

    @contextlib.contextmanager
    def layer(self, name: str) -> Iterator[None]:
        """Layer ``name``, outside every decoder block, loaded while it is quantized."""
        yield

    def close_layer(self, name: str, record: Any) -> None:
        self.records[name] = record


def quantize_blockwise(
    blocks: Any,
    names: tuple[str, ...],
    calibration: torch.Tensor | None,
    quantize_layer: Callable[..., Any],
    tokens: dict[str, int] | None = None,
    prepare_block: Callable[[torch.nn.Module, list[list[str]], Inputs], None] | None = None,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """Call ``quantize_layer(name, hessian)`` for every layer in ``names``, block by block in run
    order, and hand each block's records (what it returns) to ``blocks.close``. Without
    ``calibration`` (or for layers no calibration pass reaches) the hessian is ``None``; ``tokens``
    gets the calibration tokens each layer's Hessian saw, before ``quantize_layer`` is called.
    ``blocks`` is :class:`ModelBlocks` or a streaming source with the same methods. A ``reference``
    (with calibration) carries the full-precision stream too: ``quantize_layer(name, hessian, cross)``
    when it is ``asymmetric``, its per-block step before the block's records are closed, and its mini-batch
    size (``batch``) for every forward pass. Returns memory and calibration stats (with tokens per expert for
    a mixture-of-experts model). ``prepare_block(block, groups, inputs)``, with calibration, runs before a
    block's layers are quantized (AWQ's scaling)."""
    tokens = {} if tokens is None else tokens
    modules = dict(blocks.model.named_modules())
    prefix = blocks.prefix
    if calibration is not None and not len(blocks.blocks):
        raise UnavailableError(
            "found no list of decoder blocks holding the layers to quantize in this model. Use "
            f"{option('method', 'rtn')}."
        )
    device = _device(blocks.model)
    done: set[str] = set()
    ran: list[str] = []
    groups = 0
    inputs: Inputs = []
    start, hidden = blocks.resume_point()
    with torch.no_grad():
        if calibration is not None:
            with blocks.embeddings() as model:
                device = _device(model)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                batch = reference.batch if reference is not None and reference.batch else BATCH
                inputs = _first_block_inputs(model, blocks.blocks[0], calibration, batch)
            if hidden is not None:
                inputs = [(saved.to(device), args, kwargs) for saved, (_, args, kwargs) in zip(hidden, inputs)]
            if reference is not None:
                reference.start(inputs, names, None if hidden is None else [h.to(device) for h in hidden])
        reference = reference if calibration is not None else None
        peak = _memory(device)
        done.update(name for name in names for index in range(start) if name.startswith(f"{prefix}.{index}."))
        for index in range(start, len(blocks.blocks)):
            block = blocks.open(index)
            inside = {name: modules[name] for name in names if name.startswith(f"{prefix}.{index}.")}
            records = {}
            if calibration is None:
                records = {name: quantize_layer(name, None) for name in inside}
            groups_here = _groups_in_run_order(block, inside, inputs) if inside and calibration is not None else []
            if prepare_block is not None and groups_here:
                prepare_block(block, groups_here, inputs)
            targets = reference.run_original(block, inside, inputs) if reference is not None else []
            original = reference.layer_inputs if reference is not None and reference.asymmetric else None
            for group in merge_expert_groups(groups_here):
                for name, terms in _hessians(block, {n: inside[n] for n in group}, inputs, tokens, original).items():
                    records[name] = quantize_layer(name, *terms)
                groups += 1
                peak = max(peak, _memory(device))
            outputs = None
            if reference is not None:
                records, outputs = reference.finish(block, records, inputs, targets)
                peak = max(peak, _memory(device))
            if calibration is not None and index + 1 < len(blocks.blocks):
                outputs = outputs or _run(block, inputs)
                inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, inputs)]
            for name in set(inside) - set(records):  # in the block but never called in a calibration pass
                records[name] = quantize_layer(name, None)
            done.update(inside)
            ran.extend(inside)  # this run's blocks (a resumed run skips the first ones)
            peak = max(peak, _memory(device))
            saved = [h for h, _, _ in inputs] + (reference.hidden if reference is not None else [])
            blocks.close(index, records, saved if calibration is not None else None)
        for name in names:
            if name not in done:
                with blocks.layer(name):
                    record = quantize_layer(name, None)
                blocks.close_layer(name, record)
    stats = {
        "peak_cuda_bytes" if device.type == "cuda" else "peak_rss_bytes": peak,
        "decoder_blocks": f"{prefix} ({len(blocks.blocks)})",
    }
    if calibration is None:
        return stats
    return {
        **stats,
        "calibration_tokens": int(calibration.numel()),
        "calibration_activation_bytes": sum(h.numel() * h.element_size() for h, _, _ in inputs),
        "hessian_dtype": "float32",
        "calibration_groups": groups,
        **tokens_per_expert(tokens, ran),
    }
