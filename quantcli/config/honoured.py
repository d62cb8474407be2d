"""Every option a run cannot honour is refused in one line (exit 2), never ignored (issue 22).

What decides which options a run honours is declared where the decision lives, not listed here:

* an output format whose own layout fixes an option names it, with the reason
  (:attr:`quantcli.formats.Format.fixed_options`: a GGUF type fixes the group size, symmetry and scales,
  llama.cpp's rules the embedding's type, and GGUF stores unquantized vectors in F32);
* a method honours the run options it declares (:attr:`quantcli.methods.base.Quantizer.run_options`:
  ``embeddings`` and ``keep_dtype`` are rtn's and gptq's), and its method options are checked by its config;
* a size or quality target chooses each layer's bits and group size (:data:`ALLOCATION_FIXES`).

An option is *given* when a recipe, the command line or a Python caller set it: a method option by
naming it, a run option by any value but None (None: the method's default).
"""

from __future__ import annotations

from typing import Any

from quantcli.errors import InputError, option
from quantcli.formats import get_format
from quantcli.methods import available_methods

RUN_OPTIONS = ("embeddings", "keep_dtype")  # honoured by the methods that declare them
ALLOCATION_FIXES = {
    "group_size": "each layer's bits and group size come from its chosen candidate"
    f" ({option('allocation.candidates')})",
}


def given_options(config: Any) -> dict[str, Any]:
    """The method options and run options ``config`` sets, by name."""
    run = {name: getattr(config, name) for name in RUN_OPTIONS if getattr(config, name) is not None}
    return {**dict(config.method_options), **run}


def refuse_unhonoured(config: Any, method: Any) -> None:
    """Refuse the first given option that ``config``'s format, ``method`` or target would not use."""

    output = config.format or method.output_format
    fixed = get_format(output).fixed_options
    for name, value in given_options(config).items():
        if config.format is not None and name in fixed:
            why = fixed[name]
            raise InputError(
                f"{option(name, value)} is not used with {option('format', output)}: {why}. Drop {option(name, value)}."
            )
        if config.allocation is not None and name in ALLOCATION_FIXES:
            why = ALLOCATION_FIXES[name]
            raise InputError(
                f"{option(name, value)} is not used with {option('allocation')}: {why}. Drop {option(name, value)}."
            )
        if name in RUN_OPTIONS and name not in method.run_options:
            *others, last = [cls.name for cls in available_methods() if name in cls.run_options]
            users = f"{', '.join(others)} and {last}" if others else last
            raise InputError(
                f"method {method.name} does not use {option(name, value)} (only {users} do). Drop"
                f" {option(name, value)}."
            )
