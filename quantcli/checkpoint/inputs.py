"""What a quantize run reads is never inside the folder ``--force`` replaces (issue 25, class 5).

The model is protected by :func:`quantcli.checkpoint.paths.check_not_input`; this protects the run's other inputs
the same way (paths compared after ``realpath``): the recipe, every local dataset file (calibration,
evaluation, the target search's and verification's text) and the ``--plot`` image's folder is not one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantcli.errors import InputError, option


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def run_inputs(config: Any, recipe: Path | None = None) -> list[tuple[str, Path]]:
    """``(what, path)`` of every local file ``config`` reads besides the model."""
    found = [("recipe", Path(recipe))] if recipe is not None else []
    specs = [("calibration dataset", config.calibration.dataset)]
    if config.eval is not None:
        specs.append(("eval dataset", config.eval.dataset))
    if config.allocation is not None:
        specs += [
            ("search dataset", config.allocation.search_dataset),
            ("verify dataset", config.allocation.verify_dataset),
        ]
    found += [(what, Path(spec).expanduser()) for what, spec in specs if spec and Path(spec).expanduser().exists()]
    return found


def check_inputs_outside(target: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output folder that holds one of ``inputs``: replacing it would delete that file."""
    out = _real(target)
    for what, path in inputs:
        real = _real(path)
        if real == out or out in real.parents:
            raise InputError(
                f"output {target} holds the {what} {path}; replacing it ({option('force', True)}) would delete it."
                f" Move the {what} out of it, or choose another {option('output')}."
            )
