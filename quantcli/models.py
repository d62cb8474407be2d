"""Find and load causal LMs and tokenizers (Hub id, local folder, HF cache) and pick the layers to quantize."""

from __future__ import annotations

import copy
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli.config import DEFAULT_MODEL
from quantcli.errors import InputError, ModelLoadError
from quantcli.remote import REMOTE_CODE_HINT, refuse_remote_code

if TYPE_CHECKING:
    import torch

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = ASSETS / "stories260K"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model(spec: str) -> str:
    """A loadable location for ``spec``: the embedded default, a local folder, or a Hub id."""
    if spec in (DEFAULT_MODEL, "default"):
        return str(EMBEDDED_MODEL)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        from quantcli.gguf_input import is_gguf

        if is_gguf(path):
            return str(path)
        raise InputError(f"{spec} is a file, not a model folder. Pass the folder that holds config.json, or a .gguf file.")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep == "\\" and "\\" in spec
    if looks_like_path:
        raise InputError(f"model folder {spec} does not exist. Check the path, or pass a Hub id like 'gpt2'.")
    return spec


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from quantcli.errors import UnavailableError

        raise UnavailableError(f"--device {device} asked for CUDA, but torch sees no GPU here. Use --device cpu.")
    return device


def pick_dtype(dtype: str, device: str) -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def _hub_hint(spec: str, error: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached or has no such repo"
    return ModelLoadError(
        f"cannot load model '{spec}': it is not a local folder, not in the Hugging Face cache ({cache}/hub),"
        f" and {why}. Pass a local path, or warm the cache first with `hf download {spec}`."
        f" ({type(error).__name__})"
    )




def _first_line(error: Exception) -> str:
    text = str(error).strip()
    if "above report" in text:  # transformers' load report is hidden (TRANSFORMERS_VERBOSITY=error)
        return text.split(". For details")[0].split(" For details")[0][:300] + " (run with QUANTCLI_DEBUG=1 to see transformers' load report)"
    return text.splitlines()[0][:300] if text else type(error).__name__


def _load_error(source: str, error: Exception, what: str) -> ModelLoadError:
    if "trust_remote_code" in str(error):
        return ModelLoadError(REMOTE_CODE_HINT.format(source=source))
    if Path(source).is_dir():
        return ModelLoadError(f"cannot load {what} from {source}: {_first_line(error)}")
    return _hub_hint(source, error)


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if Path(source).is_file():  # resolve_model lets only GGUF files through
        from quantcli import gguf_input

        return gguf_input.load_tokenizer(source)
    refuse_remote_code(source, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(source, error, "the tokenizer") from error


def prefers_safetensors(source: str) -> bool | None:
    """True for a local folder holding safetensors: then pickle (``.bin``) files are never opened."""
    folder = Path(source)
    return True if folder.is_dir() and any(folder.glob("*.safetensors")) else None


def load_model(source: str, dtype: "torch.dtype", device: str, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors preferred and errors made readable.

    A folder with safetensors is loaded with ``use_safetensors=True``, so a ``pytorch_model.bin``
    beside it is never unpickled; a pickle-only checkpoint goes through transformers'
    ``torch.load(weights_only=True)``, which refuses anything but tensors.
    """
    import logging
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    # bitsandbytes logs "inputs will be cast to float16" on every int8 CPU matmul; it is expected there.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if Path(source).is_file():  # resolve_model lets only GGUF files through
        from quantcli import gguf_input

        return gguf_input.load_model(source, dtype, device, **kwargs)
    refuse_remote_code(source, trust_remote_code)
    kwargs.setdefault("use_safetensors", prefers_safetensors(source))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code,
            output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
        )
    except (OSError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError, RuntimeError) as error:
        raise _load_error(source, error, "a causal LM") from error
    from quantcli.integrity import check_loading_info

    check_loading_info(info, source)
    model.eval()
    _keep_nested_4bit_states(model)
    return model


def check_vocab(model: Any, tokenizer: Any, source: str) -> None:
    """The tokenizer must not produce ids past the model's embedding rows (they would index out of range)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but the model's embedding has {rows} rows:"
            " they do not belong together. Use the tokenizer the model was trained with."
        )


def check_finite(model: Any, source: str) -> None:
    """Refuse to quantize weights that hold NaN or inf; name the first such tensor."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            from quantcli.finite import stored_wider

            stored = stored_wider(source, name, tensor.dtype)
            if stored:
                raise ModelLoadError(
                    f"{source}: weight {name} is stored as {stored} and {bad} of its values overflow"
                    f" {str(tensor.dtype).removeprefix('torch.')} (inf after the cast). Use --dtype float32 or bfloat16."
                )
            raise ModelLoadError(
                f"{source}: weight {name} holds {bad} NaN/inf value(s); quantizing it would spread them."
                " Fix or re-download the checkpoint."
            )


def weight_files(source: str) -> list[Path]:
    """The weight files of a local or cached checkpoint (for sizes on disk)."""
    folder = Path(source)
    if folder.is_file():  # a GGUF file holds all the weights
        return [folder]
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - size on disk is informational; unknown when not cached
            return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def bytes_on_disk(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


@dataclass(frozen=True)
class Selection:
    """Layers chosen for quantization, and those skipped with the reason. ``tables`` are the input
    embedding and an untied output head (``get_input_embeddings``/``get_output_embeddings``), quantized
    per row; a head tied to the embedding is the same tensor, so only the embedding is listed."""

    names: tuple[str, ...]
    skipped: dict[str, str]
    tables: tuple[str, ...] = ()


def is_conv1d(module: Any) -> bool:
    """GPT-2's ``Conv1D`` (weight stored ``[in, out]``), recognised without importing its module."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_tied(model: Any) -> bool:
    """Whether the output head computes with the input embedding's own tensor."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embedding is not None and head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", False)


def table_names(model: Any) -> tuple[str | None, str | None]:
    """The names of the input embedding and the output head (None where the model has none)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    found = {id(module): name for name, module in model.named_modules()}
    return found.get(id(embedding)) if embedding is not None else None, found.get(id(head)) if head is not None else None


def select_modules(
    model: Any, skip_globs: tuple[str, ...] = (), include_globs: tuple[str, ...] = ("*",), tables: bool = False,
) -> Selection:
    """Linear and Conv1D layers matching ``include_globs`` minus ``skip_globs``; with ``tables``, also
    the input embedding and an untied output head (found by ``get_input_embeddings`` and
    ``get_output_embeddings``, whatever their class), else they are kept."""
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = is_tied(model)
    modules = dict(model.named_modules())
    embedding_name = next((name for name, module in modules.items() if module is embedding), None)
    names: list[str] = []
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in modules.items():
        is_table = module is embedding or module is head
        if not (is_table or isinstance(module, torch.nn.Linear) or is_conv1d(module)):
            continue
        if module is head and tied:
            skipped[name] = f"tied to {embedding_name}: the same tensor, " + ("quantized and stored once there" if tables and embedding_name in chosen else "stored once there")
        elif any(fnmatch.fnmatchcase(name, glob) for glob in skip_globs):
            skipped[name] = "matched --skip-modules"
        elif is_table and not tables:
            skipped[name] = f"{'input embedding' if module is embedding else 'output head'} kept (--embeddings keep, or a method that quantizes Linear layers only)"
        elif is_table:
            chosen.append(name)
        elif any(fnmatch.fnmatchcase(name, glob) for glob in include_globs):
            names.append(name)
    for glob in skip_globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in [*names, *chosen, *skipped]):
            raise InputError(f"--skip-modules pattern '{glob}' matches no layer. Layer names look like '{(names or list(skipped) or ['?'])[0]}'.")
    if not names:
        raise InputError("no Linear or Conv1D layer is left to quantize. Loosen --skip-modules.")
    return Selection(tuple(names), skipped, tuple(chosen))


def weight_matrix(module: Any) -> "torch.Tensor":
    """The layer's weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def dense_weight_matrix(module: Any) -> "torch.Tensor":
    """The ``[out, in]`` values a layer computes with, dequantizing bitsandbytes' packed storage."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit (Params4bit)
        import bitsandbytes.functional as F

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_4bit(data, copy.copy(state))
        return F.dequantize_4bit(data, state).float()
    if type(module).__name__ == "Linear8bitLt":  # int8 rows with per-row absmax scales
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scales.float()[:, None] / 127
    return weight_matrix(module).float()


def _unpacked_4bit(data: "torch.Tensor", state: Any) -> tuple["torch.Tensor", Any]:
    """Undo the repack bitsandbytes' AVX512-BF16 CPU kernel does at the first forward (codes tiled,
    absmax transposed to bf16). Its own inverse leaves a non-nested absmax transposed; restored here."""
    import bitsandbytes.functional as F

    packed_absmax, kept = state.absmax, getattr(state, "quantcli_nested", None)
    data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
    if kept is not None:  # the exact double-quantized absmax, not bnb's lossy re-quantization of its bf16 copy
        state.absmax, state.state2, state.offset = kept
    elif not state.nested:
        state.absmax = packed_absmax.T.reshape(-1).float()
    return data, state


def _keep_nested_4bit_states(model: Any) -> None:
    """Remember each double-quantized 4-bit absmax before the CPU kernel's repack discards it."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "nested", False):
            state.quantcli_nested = (state.absmax, state.state2, state.offset)


def unpack_cpu_4bit(model: Any) -> None:
    """Return every 4-bit weight the CPU kernel repacked to bitsandbytes' portable layout (before saving)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _unpacked_4bit(weight.data, weight.quant_state)


def set_weight_matrix(module: Any, matrix: "torch.Tensor") -> None:
    """Write ``[out, in]`` values back in the layer's own layout and dtype."""
    values = matrix.t() if is_conv1d(module) else matrix
    module.weight.data.copy_(values.to(module.weight.dtype))


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _quantization_tensors(module: Any) -> list[Any]:
    """Tensors bitsandbytes keeps outside parameters: 4-bit quant state, int8 row scales."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    tensors = []
    if state is not None:  # the CPU kernel's repacked state has no state2 (absmax dequantized to bf16)
        nested = getattr(state, "state2", None)
        tensors += [state.absmax, state.code, *([nested.absmax, nested.code, state.offset] if nested is not None else [])]
    scb = getattr(getattr(module, "weight", None), "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return [*tensors, scb]


def bytes_in_memory(model: Any) -> int:
    """Bytes of every distinct parameter, buffer and bitsandbytes quantization state (tied weights once)."""
    import torch

    seen: set[tuple[int, int, int]] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += _quantization_tensors(module)
    for tensor in tensors:
        if not torch.is_tensor(tensor) or tensor.device.type == "meta":
            continue
        try:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        except RuntimeError:  # wrapper tensor subclasses (torchao, quanto) have no plain storage
            key = (id(tensor), 0, tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
