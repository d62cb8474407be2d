"""Find and load causal LMs and tokenizers (Hub id, local folder, HF cache), check them, and size their files.

Which layers get quantized, and reading or writing their weights: :mod:`quantcli.quant.layers`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli.errors import InputError, ModelLoadError, UnavailableError, option
from quantcli.quant.layers import keep_nested_4bit_states
from quantcli.safetensors_dtypes import WIDTHS
from quantcli.sources import gguf_input
from quantcli.sources.gguf_input import is_gguf
from quantcli.sources.integrity import check_loading_info
from quantcli.sources.model_files import check_model_folder
from quantcli.sources.remote import REMOTE_CODE_HINT, refuse_remote_code
from quantcli.sources.tokenizer_check import check_tokenizer

if TYPE_CHECKING:
    import torch

ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_MODEL = "stories260K"  # the embedded model, in ASSETS
EMBEDDED_MODEL = ASSETS / "stories260K"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model(spec: str) -> str:
    """A loadable location for ``spec``: the embedded default, a local folder, or a Hub id."""
    if spec in (DEFAULT_MODEL, "default"):
        return str(EMBEDDED_MODEL)
    path = Path(spec).expanduser()
    if path.is_dir():
        check_model_folder(path)  # bounded small files, layer count against the weights: before any parser
        return str(path)
    if path.exists():
        if is_gguf(path):
            return str(path)
        raise InputError(
            f"{spec} is a file, not a model folder. Pass the folder that holds config.json, or a .gguf file."
        )
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep == "\\" and "\\" in spec
    if looks_like_path:
        raise InputError(f"model folder {spec} does not exist. Check the path, or pass a Hub id like 'gpt2'.")
    return spec


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError(
            f"{option('device', device)} asked for CUDA, but torch sees no GPU here. Use {option('device', 'cpu')}."
        )
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
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
        return (
            text.split(". For details")[0].split(" For details")[0][:300]
            + " (run with QUANTCLI_DEBUG=1 to see transformers' load report)"
        )
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


def load_model(source: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False, **kwargs: Any) -> Any:
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
        return gguf_input.load_model(source, dtype, device, **kwargs)
    refuse_remote_code(source, trust_remote_code)
    kwargs.setdefault("use_safetensors", prefers_safetensors(source))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            device_map=device,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except (OSError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError, RuntimeError) as error:
        raise _load_error(source, error, "a causal LM") from error

    check_loading_info(info, source)
    model.eval()

    keep_nested_4bit_states(model)
    return model


def check_vocab(model: Any, tokenizer: Any, source: str) -> None:
    """The tokenizer must not produce ids past the model's embedding rows (they would index out of range)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but the model's embedding has {rows} rows:"
            " they do not belong together. Use the tokenizer the model was trained with."
        )

    check_tokenizer(tokenizer, rows, source)


def check_finite(model: Any, source: str) -> None:
    """Refuse to quantize weights that hold NaN or inf; name the first such tensor."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            stored = _stored_wider(source, name, tensor.dtype)
            if stored:
                raise ModelLoadError(
                    f"{source}: weight {name} is stored as {stored} and {bad} of its values overflow"
                    f" {str(tensor.dtype).removeprefix('torch.')} (inf after the cast). Use "
                    f"{option('dtype', 'float32')} or bfloat16."
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
        except Exception:
            return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def bytes_on_disk(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _stored_wider(source: str, name: str, dtype: Any) -> str | None:
    """The dtype ``name`` is stored in when that is wider than ``dtype`` (so NaN/inf came from the cast), else None."""
    from safetensors import safe_open

    try:
        for file in sorted(Path(resolve_model(source)).glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                if name in handle.keys():
                    stored = handle.get_slice(name).get_dtype()
                    return (
                        stored
                        if WIDTHS.get(stored, 0) > dtype.itemsize
                        or (stored == "BF16" and str(dtype) == "torch.float16")
                        else None
                    )
    except Exception:
        return None
    return None


def skeleton(source: str, dtype: Any, trust_remote_code: bool) -> Any:
    """The model with every parameter on the meta device (buffers such as RoPE's are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_remote_code(source, trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype).eval()
    model.tie_weights()  # as from_pretrained does: a tied head shares the embedding's parameter
    return model
