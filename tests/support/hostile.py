"""Helpers for the hostile-input tests (issue 25): a real ``quantcli`` process, and the staging folder an
interrupted ``--low-memory`` run leaves behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(argv: list[str], cwd: Path, timeout: float = 120, **env: str) -> tuple[int, str, list[str]]:
    """Run ``python -m quantcli ARGV`` in ``cwd``: exit code, stdout and the stderr lines."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(
        [sys.executable, "-m", "quantcli", *map(str, argv)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr.splitlines()


class StopAfter:
    """A progress reporter that presses Ctrl-C when the method reports its ``layers``-th layer done."""

    def __init__(self, layers: int) -> None:
        self.layers, self.finished = layers, 0

    @contextlib.contextmanager
    def task(self, description, total=None):
        def advance(count):
            self.finished += count
            if self.finished >= self.layers:
                raise KeyboardInterrupt

        yield advance


LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
STREAM = {"bits": 4, "method": "rtn", "eval": None, "low_memory": True}


def interrupted_staging(target: Path, model: str, blocks: int = 2, **options) -> Path:
    """Run ``--low-memory`` rtn on ``model`` into ``target`` and interrupt it after ``blocks`` decoder blocks."""
    from quantcli.config.recipes import config_from_mapping
    from quantcli.errors import ResumableInterrupt
    from quantcli.run.pipeline import quantize

    try:
        config = config_from_mapping({**STREAM, "model": model, "output": target, **options})
        quantize(config, StopAfter(blocks * LAYERS_PER_BLOCK + 1))
    except ResumableInterrupt:
        pass
    (staging,) = target.parent.glob(f".{target.name}.partial-*")
    # renamed after a process that is gone: the staging folder a --resume in another process adopts
    return staging.rename(staging.with_name(f".{target.name}.partial-{_dead_pid()}"))


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def resume_argv(model: str, target: Path) -> list[str]:
    return ["quantize", model, "--bits", "4", "--method", "rtn", "--low-memory", "--resume", "-o", target, "-q"]


def copy_gguf(source: Path, target: Path, drop=(), extra=(), metadata=None, arch=None) -> Path:
    """``source`` rewritten by the ``gguf`` package's writer: tensors dropped or added, metadata changed
    (``{key: value}``; a key renamed with ``{old: (new, value)}``), the architecture relabelled."""
    import gguf

    metadata = metadata or {}
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch or reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key, value = name, metadata.get(name, field.contents())
        if isinstance(value, tuple):
            key, value = value
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name not in drop:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    for name, data in extra:
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
