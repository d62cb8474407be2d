"""Read a llama.cpp ``.gguf`` file as an ordinary dense model, through transformers' own GGUF loader
(a file with experts through :mod:`quantcli.sources.gguf_experts`).

transformers dequantizes every tensor (Q4_1, Q8_0, ...) to the asked dtype and builds the matching
architecture and tokenizer (with the chat template the file carries). The source's quantization
type, read with the ``gguf`` package's reader, is kept for the report: a model dequantized from a
4-bit grid is not the same starting point as one trained in bf16.

The ``gguf`` package (llama.cpp's own Python reader) is an optional extra: ``pip install 'quantcli[gguf]'``.
"""

from __future__ import annotations

import contextlib
import stat
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantcli.errors import ModelLoadError, UnavailableError
from quantcli.sources.gguf_check import check_blocks, check_layout, check_loaded

MISSING = (
    "reading {path} needs the gguf package (llama.cpp's reader), which is not installed."
    " Run: pip install 'quantcli[gguf]'"
)


def is_gguf(source: str | Path) -> bool:
    """A local file that starts with GGUF's magic bytes (the suffix alone is not trusted)."""
    path = Path(source)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the open, a device never end
            return False
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def _require_gguf(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise UnavailableError(MISSING.format(path=path)) from None
    return gguf


def source_format(source: str | Path) -> dict[str, Any]:
    """What the file held before dequantization: its file type and the count of tensors per type."""
    path = Path(source)
    gguf = _require_gguf(path)

    check_layout(path)  # bounded: the reader below would loop over any count the header claims
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as error:
        raise ModelLoadError(
            f"cannot read the GGUF file {path} ({_first_line(error)}): it is corrupt or truncated. Download it again."
        ) from None
    counts = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(value).name
        except ValueError:  # a type newer than this gguf package
            file_type = str(value)
    return {"format": "gguf", "file_type": file_type, "tensor_types": dict(counts.most_common())}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(source)
    source_format(path)  # a corrupt file fails here, with a readable message
    try:
        with alone(path) as folder:  # the file's own tokenizer, never tokenizer files lying beside it
            # a GGUF carries no code
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read the tokenizer of the GGUF file {path}: {_first_line(error)}") from None


@contextlib.contextmanager
def alone(path: Path) -> Iterator[Path]:
    """A temporary folder holding only a link to ``path``: transformers reads the GGUF file and nothing beside it."""
    with tempfile.TemporaryDirectory(prefix="quantcli-gguf-") as folder:
        (Path(folder) / path.name).symlink_to(path.resolve())
        yield Path(folder)


def load_model(source: str | Path, dtype: Any, device: str, **kwargs: Any) -> Any:
    """The file's model, dequantized to ``dtype`` and plain (``save_pretrained`` works on it).

    With a ``quantization_config`` (bitsandbytes), which transformers refuses to combine with a GGUF
    file, the dense model goes through a temporary safetensors folder that is removed after loading.
    """
    from transformers import AutoModelForCausalLM

    path = Path(source)
    source_format(path)  # a corrupt file (or no gguf package) fails here, with a readable message
    reader = _require_gguf(path).GGUFReader(path)
    check_blocks(reader, path)  # before a model of the declared size is built
    quantization_config = kwargs.pop("quantization_config", None)
    kwargs.pop("use_safetensors", None)
    from quantcli.sources.gguf_experts import experts_architecture  # imports torch: not at the CLI's import
    from quantcli.sources.gguf_experts import load_model as load_experts_model

    if experts_architecture(reader):  # transformers' loader reads no mixture-of-experts file correctly
        model = load_experts_model(path, reader, dtype, "cpu" if quantization_config else device)
    else:
        model = _transformers_model(path, reader, dtype, None if quantization_config else device, kwargs)
    if quantization_config is None:
        return model
    with tempfile.TemporaryDirectory(prefix="quantcli-gguf-") as folder:
        model.save_pretrained(folder)
        del model
        requantized = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            device_map=device,
            quantization_config=quantization_config,
            use_safetensors=True,
            **kwargs,
        )
    return requantized.eval()


def _transformers_model(path: Path, reader: Any, dtype: Any, device: str | None, kwargs: dict[str, Any]) -> Any:
    """The file's dense model through transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        with alone(path) as folder:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder),
                gguf_file=path.name,
                dtype=dtype,
                device_map=device,
                quantization_config=GgufConfig(dequantize=True),
                output_loading_info=True,
                **kwargs,
                **_gpt2_positions(path),
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the GGUF file {path}: {_first_line(error)}") from None
    check_loaded(model, info, reader, path)
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    return model.eval()


def _gpt2_positions(path: Path) -> dict[str, int]:
    """transformers 5.24 reads ``gpt2.context_length`` as ``n_ctx``, not ``n_positions`` (the size of
    GPT-2's position table), so a GPT-2 file with other than 1024 positions fails to load; pass it."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("gpt2.context_length")
    return {} if field is None else {"n_positions": int(field.contents())}


def describe(source: str | Path) -> dict[str, Any] | None:
    """:func:`source_format` for a GGUF file, ``None`` for anything else."""
    return source_format(source) if is_gguf(source) else None


def summary(info: dict[str, Any]) -> str:
    """One line for the console, e.g. ``GGUF MOSTLY_Q4_1 (Q4_1 x210, F32 x61, Q8_0 x1), dequantized``."""
    counts = ", ".join(f"{kind} x{count}" for kind, count in info["tensor_types"].items())
    return f"GGUF {info['file_type'] or 'file'} ({counts}), dequantized on load"
