"""A checkpoint must hold exactly the weights its config describes (quantcli.json's own claims are checked
in :mod:`quantcli.checkpoint.metadata`). transformers fills a missing weight with random values and reports it only in a
log line quantcli hides, so every load path checks here and refuses instead: missing, unexpected or
mis-shaped tensors are errors, except weights tied to another one (lm_head to the embedding)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, InputError, option

_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")  # buffers old checkpoints still carry


def few_names(keys: Any) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def _refuse(source: str, missing: Any = (), unexpected: Any = (), mismatched: Any = ()) -> None:
    parts = []
    if missing:
        parts.append(
            f"it lacks {len(missing)} weight(s) the config needs ({few_names(missing)}), which would be random"
        )
    if unexpected:
        parts.append(f"it holds {len(unexpected)} weight(s) the config has no place for ({few_names(unexpected)})")
    if mismatched:
        parts.append("shapes differ from the config: " + "; ".join(sorted(mismatched)[:3]))
    if parts:
        raise CheckpointError(
            f"{source} does not match its config.json: {'; '.join(parts)}. The checkpoint is incomplete or its"
            " config.json is wrong (e.g. more layers than the weights hold): re-download it or fix config.json."
        )


def _ignored(model: Any, keys: set[str]) -> set[str]:
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), *_ALWAYS_IGNORED]
    regex = re.compile("|".join(f"({pattern})" for pattern in patterns))
    return {key for key in keys if not regex.search(key)}


def check_loading_info(info: dict[str, Any], source: str) -> None:
    """Refuse what ``from_pretrained(output_loading_info=True, ignore_mismatched_sizes=True)`` reports."""
    mismatched = []
    for entry in info.get("mismatched_keys") or ():
        key, *shapes = entry if isinstance(entry, (tuple, list)) else (entry,)
        mismatched.append(
            f"{key} is {' in the file vs '.join(str(tuple(s)) for s in shapes)} in the config"
            if len(shapes) == 2
            else str(key)
        )
    _refuse(source, info.get("missing_keys") or (), info.get("unexpected_keys") or (), mismatched)


def check_streamed(model: Any, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The tensors a streamed (``--low-memory``) read will find, against the meta-device skeleton."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    satisfied = {name for names in aliases.values() if any(n in shapes for n in names) for name in names}
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # target -> source, tied after loading
    satisfied |= {target for target, origin in tied.items() if origin in shapes}
    missing = set(expected) - set(shapes) - satisfied
    unexpected = _ignored(model, set(shapes) - set(expected))
    mismatched = [
        f"{key} is {shapes[key]} in the file vs {expected[key]} in the config"
        for key in sorted(set(shapes) & set(expected))
        if shapes[key] != expected[key]
    ]
    _refuse(source, missing, unexpected, mismatched)


def file_shapes(where: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """``tensor -> shape`` read from the safetensors headers only (no tensor data is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def check_same_vocabulary(
    name: str, model: Any, tokenizer: Any, base: str, base_model: Any, base_tokenizer: Any
) -> None:
    """KL and top-1 agreement compare the two models token by token: they need one vocabulary."""
    rows = model.get_output_embeddings().weight.shape[0]
    base_rows = base_model.get_output_embeddings().weight.shape[0]
    if rows != base_rows or tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise InputError(
            f"{option('base', base)} has another vocabulary than {name} ({base_rows} vs {rows} output rows, or "
            "different tokens):"
            " KL divergence and top-1 agreement need the same tokens. Pass the model it was quantized from as "
            f"{option('base')}."
        )
