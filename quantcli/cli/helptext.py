"""The example section of each command's ``--help`` and the exit codes under ``quantcli --help``.
(``\\b`` keeps click from re-wrapping the lines that follow it.)"""

from __future__ import annotations

from typing import Any

from quantcli.errors import EXIT_CODES


def _exit_codes() -> str:
    return "\b\nExit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


EXAMPLES = {
    "quantize": """\b
Examples:
  quantcli quantize --bits 4                        # the embedded stories260K, RTN INT4 on CPU
  quantcli quantize gpt2 --bits 8 --method bnb-int8 -o gpt2-int8
  quantcli quantize ./my-model --bits 4 --method gptq --calib-samples 64 --max-ppl-increase 5
  quantcli quantize ./big-model --bits 4 --low-memory -o big-rtn-w4   # one decoder block at a time""",
    "eval": """\b
Examples:
  quantcli eval stories260K-rtn-w4
  quantcli eval stories260K-rtn-w4 --base stories260K --json   # adds KL divergence and top-1 agreement
  quantcli eval ./my-model --dataset notes.txt --seq-len 512""",
    "inspect": """\b
Examples:
  quantcli inspect stories260K-rtn-w4
  quantcli inspect stories260K-rtn-w4 --json""",
    "compare": """\b
Examples:
  quantcli compare out-rtn-w4 out-gptq-w4
  quantcli compare out-rtn-w4 out-gptq-w4 --base stories260K --markdown
  quantcli compare out-rtn-w4 out-gptq-w4 --base stories260K --plot tradeoff.png""",
    "bench": """\b
Examples:
  quantcli bench stories260K-rtn-w8 --base stories260K
  quantcli bench stories260K-rtn-w8 --backend int8-cpu --base stories260K --min-speedup 1.2""",
    "methods": """\b
Example:
  quantcli methods""",
}


def _name(info: Any) -> str:
    return info.name or info.callback.__name__.removesuffix("_command").replace("_", "-")


def add_help_sections(app: Any) -> None:
    """Attach the examples to each command and the exit codes to the root help."""
    app.info.epilog = _exit_codes()
    for info in app.registered_commands:
        info.epilog = EXAMPLES.get(_name(info))
