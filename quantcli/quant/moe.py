"""Mixture-of-experts models: each expert's matrix as a layer of its own.

transformers 5 stores the experts of Qwen3-MoE, Mixtral, DeepSeek, GLM... as fused 3-D parameters
(``experts.gate_up_proj``: experts x 2*inter x hidden; ``experts.down_proj``), not as ``nn.Linear``.
:func:`unfuse` swaps each such module for :class:`UnfusedExperts`, one ``nn.Linear`` per expert and
projection, named as the checkpoints on the Hub name them (``experts.3.gate_proj``, Mixtral's
``experts.3.w1``). The names come from transformers' own conversion mapping, the one that merges
per-expert checkpoint tensors into the fused parameters at load, read backwards: no per-architecture
table here. Every method then selects, groups, calibrates (a Linear's hooks see the tokens routed to
that expert) and stores experts like any Linear, and the per-expert names are the layout plain
transformers merges at load and vLLM's MoE loader reads. :func:`refuse` puts the values back into the
fused module, so the model quantcli evaluates computes exactly as the reloaded checkpoint does.

A fused experts module whose conversion is not a plain per-expert merge (transposed or interleaved
layouts, biases) is left fused and stays in 16 bits; :func:`kept_matmuls` names it, and every other
matrix no method touches (routers), for the layer map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

ROUTER_NOTE = "router: kept in 16 bits (small and sensitive: it picks the experts)"
FUSED_NOTE = (
    "fused experts (3-D parameters) kept in 16 bits: rtn, gptq, blockround and awq"
    " (compressed-tensors; all but awq also --format gguf) quantize each expert where transformers'"
    " conversion mapping gives the per-expert layout; a bitsandbytes checkpoint cannot hold them"
    " (transformers' bitsandbytes integration quantizes nn.Linear only)"
)


@dataclass(frozen=True)
class ExpertLayout:
    """How one fused parameter splits into per-expert matrices: ``names`` in concatenation order."""

    parameter: str
    names: tuple[str, ...]


def _is_plain_merge(converter: Any) -> bool:
    kinds = [type(op).__name__ for op in converter.operations]
    concat = [op for op in converter.operations if type(op).__name__ == "Concatenate"]
    return (
        kinds[:1] == ["MergeModulelist"]
        and set(kinds) <= {"MergeModulelist", "Concatenate"}
        and all(op.dim == 1 for op in concat)
    )


def expert_layouts(model: Any) -> dict[str, ExpertLayout]:
    """Fused parameter name (``gate_up_proj``) -> its per-expert names, from transformers' mapping."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    layouts = {}
    for converter in get_model_conversion_mapping(model):
        if type(converter).__name__ != "WeightConverter" or not _is_plain_merge(converter):
            continue
        targets, sources = converter._original_target_patterns, converter._original_source_patterns
        found = [re.search(r"experts\.\*\.(\w+)\.weight$", source) for source in sources]
        target = re.search(r"experts\.(\w+)$", targets[0]) if len(targets) == 1 else None
        if target and all(found):
            layouts[target.group(1)] = ExpertLayout(target.group(1), tuple(match.group(1) for match in found))
    return layouts


def fused_experts(model: Any) -> dict[str, Any]:
    """Every module holding experts as 3-D parameters (name -> module)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.dim() == 3 for p in module.parameters(recurse=False)) and hasattr(module, "num_experts")
    }


class Expert(torch.nn.Module):
    """One expert's projections as ``nn.Linear`` (names as the checkpoint stores them)."""


class UnfusedExperts(torch.nn.Module):
    """A fused experts module as ``num_experts`` :class:`Expert` children, same forward (eager loop)."""

    def __init__(self, fused: Any, layouts: dict[str, ExpertLayout]) -> None:
        super().__init__()
        self.fused = [fused]  # a list: not a child module, so its parameters are not the model's
        self.num_experts = fused.num_experts
        self.act_fn = fused.act_fn
        self.layouts = [layouts[name] for name, _ in fused.named_parameters(recurse=False)]
        stacks = {layout.parameter: getattr(fused, layout.parameter).data for layout in self.layouts}
        for layout in self.layouts:  # the fused tensors are rebuilt by refuse(): do not hold them twice
            stacked = stacks[layout.parameter]
            getattr(fused, layout.parameter).data = torch.empty(0, dtype=stacked.dtype, device=stacked.device)
        for index in range(self.num_experts):
            expert = Expert()
            for layout in self.layouts:
                stacked = stacks[layout.parameter][index]
                for name, part in zip(layout.names, stacked.chunk(len(layout.names), dim=0)):
                    linear = torch.nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
                    linear.weight = torch.nn.Parameter(part.clone(), requires_grad=False)
                    expert.add_module(name, linear)
            self.add_module(str(index), expert)

    def projections(self, index: int) -> tuple[list[Any], Any]:
        """Expert ``index``'s input projections (gate, up) and its output projection (down)."""
        expert = getattr(self, str(index))
        first, last = self.layouts[0], self.layouts[-1]
        return [getattr(expert, name) for name in first.names], getattr(expert, last.names[0])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in (int(row[0]) for row in hit):
            if index == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[index])
            current = hidden_states[token_idx]
            inputs, down = self.projections(index)
            outputs = [linear(current) for linear in inputs]
            hidden = self.act_fn(outputs[0]) * outputs[1] if len(outputs) == 2 else self.act_fn(outputs[0])
            hidden = down(hidden) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, hidden.to(final.dtype))
        return final


def _set(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unfuse(model: Any) -> list[str]:
    """Replace every fused experts module transformers knows the per-expert layout of by
    :class:`UnfusedExperts` (in place); returns the names of those left fused."""
    layouts = expert_layouts(model)
    kept = []
    for name, module in fused_experts(model).items():
        names = [param for param, _ in module.named_parameters(recurse=False)]
        if not names or any(param not in layouts for param in names) or getattr(module, "has_bias", False):
            kept.append(name)
            continue
        _set(model, name, UnfusedExperts(module, layouts))
    return kept


def refuse(model: Any) -> None:
    """Write each :class:`UnfusedExperts`' current values back into its fused module and restore it."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, UnfusedExperts):
            continue
        fused = module.fused[0]
        with torch.no_grad():
            for layout in module.layouts:
                values = [
                    torch.cat([getattr(getattr(module, str(index)), part).weight for part in layout.names])
                    for index in range(module.num_experts)
                ]
                getattr(fused, layout.parameter).data = torch.stack(values).to(getattr(fused, layout.parameter).dtype)
        _set(model, name, fused)


def routers(model: Any) -> dict[str, Any]:
    """Modules beside an experts module that hold a 2-D ``[num_experts, hidden]`` weight (the routers)."""
    found = {}
    fused = fused_experts(model)
    experts = [
        (name.rpartition(".")[0], module.num_experts)
        for name, module in model.named_modules()
        if isinstance(module, UnfusedExperts) or name in fused
    ]
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        parent = name.rpartition(".")[0]
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and (parent, weight.shape[0]) in experts:
            found[name] = module
    return found


def kept_matmuls(model: Any) -> dict[str, str]:
    """Matrices no method quantizes, with the reason: routers, and fused experts left fused."""
    kept = {name: ROUTER_NOTE for name in routers(model)}
    kept.update({name: FUSED_NOTE for name in fused_experts(model)})
    return kept


def expert_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """The ``[out, in]`` shape of every per-expert layer of ``model``'s fused experts, by its layer name."""
    layouts = expert_layouts(model) if fused_experts(model) else {}
    shapes = {}
    for name, module in fused_experts(model).items():
        for parameter, tensor in module.named_parameters(recurse=False):
            layout = layouts.get(parameter)
            if layout is None or tensor.dim() != 3:
                continue
            for index in range(tensor.shape[0]):
                for part in layout.names:
                    shapes[f"{name}.{index}.{part}"] = (tensor.shape[1] // len(layout.names), tensor.shape[2])
    return shapes


EXPERT_LAYER = re.compile(r"\.experts\.(\d+)\.(\w+)$")


def expert_target(names: list[str]) -> str:
    """One compressed-tensors target for expert layers ``names`` (``re:``, naming ``experts``: the
    pattern transformers looks for to pick the experts' scheme), whatever their parent's checkpoint name
    (Mixtral's ``mlp`` is ``block_sparse_moe`` on disk)."""
    parts = sorted({match.group(2) for match in map(EXPERT_LAYER.search, names) if match})
    return rf"re:.*\.experts\.\d+\.({'|'.join(map(re.escape, parts))})$"


def is_expert_layer(name: str) -> bool:
    return EXPERT_LAYER.search(name) is not None


def checkpoint_renamer(model: Any) -> Any:
    """Turns a checkpoint tensor name into the model's (transformers' plain renamings, e.g. Mixtral's
    ``block_sparse_moe`` -> ``mlp``), as transformers does at load."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    renamings = [t for t in get_model_conversion_mapping(model) if type(t).__name__ == "WeightRenaming"]

    def rename(key: str) -> str:
        for renaming in renamings:
            key = renaming.rename_source_key(key)[0]
        return key

    return rename


def merge_expert_groups(groups: list[list[str]]) -> list[list[str]]:
    """One calibration group for every expert's input projections of an experts module, one for their
    output projections: experts do not feed each other, so each expert's down projection needs only its
    own gate/up done first, and ``2·num_experts`` block passes become 2."""
    merged: list[list[str]] = []
    where: dict[tuple, list[str]] = {}
    for group in groups:
        matches = [EXPERT_LAYER.search(name) for name in group]
        keys = {
            (name[: match.start()], tuple(sorted(m.group(2) for m in matches)))
            for name, match in zip(group, matches)
            if match
        }
        if len(keys) != 1 or not all(matches):
            merged.append(group)
            continue
        key = keys.pop()
        if key in where:
            where[key].extend(group)
        else:
            where[key] = list(group)
            merged.append(where[key])
    return merged


def tokens_per_expert(tokens: dict[str, int], names: Any) -> dict[str, Any]:
    """``{"tokens_per_expert": {experts module: [calibration tokens routed to expert 0, 1, ...]}}`` for
    the expert layers among ``names`` (an expert no token reached: 0), or nothing without experts."""
    routed: dict[str, dict[int, int]] = {}
    for name in names:
        match = EXPERT_LAYER.search(name)
        if match:
            routed.setdefault(name[: match.start()] + ".experts", {}).setdefault(
                int(match.group(1)), tokens.get(name, 0)
            )
    if not routed:
        return {}
    return {
        "tokens_per_expert": {
            module: [counts.get(i, 0) for i in range(max(counts) + 1)] for module, counts in routed.items()
        }
    }


def calibration_rule(name: str, tokens: dict[str, int], in_features: int) -> str | None:
    """Why expert layer ``name`` is rounded to nearest instead of GPTQ'd, or None. The rule: an expert
    that received fewer routed calibration tokens than it has inputs has a rank-deficient Hessian, so
    GPTQ would fit its error compensation to directions no token showed; it is rounded to nearest."""
    routed = tokens.get(name, 0)  # no routed token: the expert never ran in a calibration pass
    if not is_expert_layer(name) or routed >= in_features:
        return None
    return (
        f"round-to-nearest: {routed} calibration tokens were routed to this expert, fewer than its {in_features}"
        " inputs (a rank-deficient Hessian); more calibration samples give it GPTQ"
    )
