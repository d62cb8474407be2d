"""Documented conditions are not internal errors (issue 25, class 8): each gets its own line and exit code.

* stdout that cannot take the result (a closed or broken pipe, ``quantcli inspect X | head -1``; a full
  disk or file size limit under a redirect): exit 2, and the interpreter's last flush goes nowhere;
* out of memory (``MemoryError``, ``torch.OutOfMemoryError``): exit 5 with the options that use less;
* an output name whose staging name (``.NAME.partial-PID``) would pass the file system's name limit:
  exit 2, before any work;
* re-quantizing a checkpoint that is already quantized (quantcli's compressed-tensors, bitsandbytes or
  any ``quantization_config``): exit 2, naming it;
* ``bench`` past the model's position table: exit 2, as ``eval`` refuses it;
* a report.json field of the wrong type read by ``compare``: exit 3, naming the field.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantcli.errors import CheckpointError, InputError, OutputWriteError, UnavailableError, option
from quantcli.limits import shown
from quantcli.sources.model_files import read_json

STREAM_ERRNOS = (errno.EPIPE, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EBADF)
STAGING_SUFFIX = len(".partial-") + len(str(2**22)) + 1  # the leading dot, then .partial-PID (pid_max is at most 2^22)


@contextlib.contextmanager
def documented_conditions() -> Iterator[None]:
    """Turn a stdout that cannot be written and running out of memory into their own errors."""
    try:
        yield
        sys.stdout.flush()
    except OSError as error:
        if error.errno not in STREAM_ERRNOS or error.filename is not None:  # files being written name themselves
            raise
        with contextlib.suppress(OSError, ValueError):  # the interpreter flushes stdout again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputWriteError(
            f"cannot write the result to stdout: {error.strerror or error} (a closed pipe or a full disk)."
        ) from None
    except SystemExit as error:  # rich turns a broken pipe into SystemExit(1), stdout already sent to /dev/null
        if not isinstance(error.__context__, BrokenPipeError):
            raise
        raise OutputWriteError(
            "cannot write the result to stdout: Broken pipe (a closed pipe or a full disk)."
        ) from None
    except MemoryError:
        raise _out_of_memory("MemoryError") from None
    # torch: OutOfMemoryError on CUDA, "DefaultCPUAllocator: can't allocate memory" on CPU
    except RuntimeError as error:
        if type(error).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(error):
            raise
        raise _out_of_memory(str(error).splitlines()[0][:200]) from None


def _out_of_memory(what: str) -> UnavailableError:
    return UnavailableError(
        f"out of memory ({what}). Use {option('low_memory', True)} (quantize), a smaller {option('eval.batch_size')},"
        f" {option('calibration.samples')} or {option('eval.max_tokens')}, or a machine with more memory."
    )


def check_output_name(target: Path) -> None:
    """The staging folder ``.NAME.partial-PID`` beside ``target`` must fit the file system's name limit."""
    parent = Path(target).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(Path(target).name))
    if size + STAGING_SUFFIX > limit:
        raise InputError(
            f"output name {shown(Path(target).name)} is {size} bytes; quantcli writes it as .NAME.partial-PID first,"
            " which"
            f" must fit the file system's {limit}-byte limit. Use an {option('output')} name of at most"
            f" {limit - STAGING_SUFFIX} bytes."
        )


def check_not_quantized(source: str) -> None:
    """A checkpoint that is already quantized is not re-quantized: its weights are codes, not a model's."""
    folder = Path(source)
    config = read_json(folder / "config.json") if folder.is_dir() else None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not quantization:
        return
    kind = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
    writer = "quantcli" if (folder / "quantcli.json").is_file() else "another tool"
    raise InputError(
        f"{source} is already quantized ({shown(kind)}, written by {writer}); quantizing its codes again would only"
        " lose more. Quantize the original full-precision model (quantcli inspect names it) instead."
    )


def check_bench_context(model: Any, prompt_tokens: int, new_tokens: int) -> None:
    """``bench`` refuses a prompt plus decoded tokens past the model's position table, as eval does."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise InputError(
            f"{option('prompt_tokens', prompt_tokens)} plus {option('new_tokens', new_tokens)} is"
            f" {prompt_tokens + new_tokens} positions,"
            f" beyond the model's context of {limit} tokens (max_position_embeddings). Use at most {limit} in all."
        )


OBJECT, INTEGER, NUMBER = (dict, "an object"), (int, "an integer"), ((int, float), "a number")
REPORT_TYPES = {
    "size": OBJECT,
    "perplexity_after": OBJECT,
    "perplexity_before": OBJECT,
    "size.parameters": INTEGER,
    "perplexity_after.perplexity": NUMBER,
    "perplexity_before.perplexity": NUMBER,
    "perplexity_after.settings": OBJECT,
}


def check_report_types(report: Any, path: Path) -> None:
    """The report.json fields ``compare`` reads are of their type or null."""
    if not isinstance(report, dict):
        raise CheckpointError(
            f"{path} is not a JSON object (got {type(report).__name__}). Re-run quantcli quantize, or delete it."
        )
    for field, (kinds, word) in REPORT_TYPES.items():
        outer, _, inner = field.partition(".")
        value = report.get(outer) if not inner else (report.get(outer) or {}).get(inner)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: field {field} is {shown(value)}, not {word}. The file is damaged or"
                " was not written by quantcli: re-run quantcli quantize, or delete it to have compare evaluate the"
                " folder."
            )
