"""llama.cpp as a measuring instrument: HF folder -> GGUF (llama.cpp's convert_hf_to_gguf.py), its own
quantizer, and per-token NLL over exactly the windows quantcli scores (quantcli.measure.perplexity.windows), on the
token ids every llama.cpp table uses (``MODELS``, :func:`eval_ids`).

llama.cpp comes from ``make llama-cpp``: llama-cpp-python built from source into ``.llamacpp/`` (or
``$QUANTCLI_LLAMACPP``), with ``convert_hf_to_gguf.py`` and its ``gguf-py`` beside it in
``.llamacpp/llama.cpp/``. It is never a quantcli dependency: the folder goes at the end of
``sys.path`` only when :func:`llama_cpp_module` is called.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .models import REPO, smollm2_folder

LLAMACPP_DIR = Path(os.environ.get("QUANTCLI_LLAMACPP", REPO / ".llamacpp"))
CONVERT_SCRIPT = LLAMACPP_DIR / "llama.cpp" / "convert_hf_to_gguf.py"
# llama.cpp's file types (enum llama_ftype in llama.h), by the names its quantize tool uses.
FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
}

Logits = Callable[[Sequence[int]], np.ndarray]  # token ids of one window -> [len, vocab] float32 logits
HARNESS_TOLERANCE_PCT = 0.1  # |F32 GGUF ppl / HF fp32 ppl - 1| allowed, in percent
MODELS = {  # each model's eval text, tokens and window: the same in every llama.cpp table and test
    "stories260K": {
        "dataset": "tinystories:eval",
        "max_tokens": 32768,
        "seq_len": 256,
        "tokenizer_model": REPO / "benchmarks" / "data" / "stories260K" / "tokenizer.model",
    },
    "smollm2": {"dataset": "benchmarks/data/wikitext-2/wiki.valid.eval.txt", "max_tokens": 16384, "seq_len": 512},
}


def model_folder(name: str) -> Path:
    """The HF folder of a ``MODELS`` name: the embedded stories260K, or SmolLM2 (``make smollm2``)."""
    if name == "stories260K":
        from quantcli.sources.models import EMBEDDED_MODEL

        return Path(EMBEDDED_MODEL)
    return smollm2_folder()


def eval_text(dataset: str) -> str:
    """The eval text as quantcli's stream protocol reads it: a file's exact UTF-8, or the embedded
    TinyStories split's paragraphs joined by a blank line."""
    path = REPO / dataset
    if path.is_file():
        return path.read_bytes().decode("utf-8")
    from quantcli.sources.datasets import read_documents

    source = read_documents(dataset)
    text = getattr(source, "text", None)
    return text if text is not None else "\n\n".join(source.documents)


def eval_ids(tokenizer: Any, dataset: str, max_tokens: int) -> list[int]:
    return list(tokenizer(eval_text(dataset))["input_ids"][:max_tokens])


def llama_cpp_module() -> Any:
    """``import llama_cpp`` from the side folder; ImportError with the fix when it is not built."""
    if str(LLAMACPP_DIR) not in sys.path and LLAMACPP_DIR.is_dir():
        sys.path.append(str(LLAMACPP_DIR))
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(
            f"llama-cpp-python is not importable from {LLAMACPP_DIR} ({error}). Run `make llama-cpp`."
        ) from None
    return llama_cpp


def convert(
    hf_folder: str | Path, out_file: str | Path, outtype: str = "f32", tokenizer_model: str | Path | None = None
) -> float:
    """Write ``out_file`` from an HF folder with llama.cpp's own converter; returns seconds taken.
    ``tokenizer_model``: a SentencePiece model the converter reads as ``tokenizer.model`` beside
    the folder's files (linked into a temporary folder; the HF folder is not touched)."""
    if not CONVERT_SCRIPT.is_file():
        raise FileNotFoundError(f"{CONVERT_SCRIPT} is missing. Run `make llama-cpp`.")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(LLAMACPP_DIR)])))
    with tempfile.TemporaryDirectory(prefix="gguf-convert-") as tmp:
        folder = Path(hf_folder).resolve()
        if tokenizer_model is not None:
            for item in folder.iterdir():
                (Path(tmp) / item.name).symlink_to(item)
            shutil.copyfile(tokenizer_model, Path(tmp) / "tokenizer.model")
            folder = Path(tmp)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(CONVERT_SCRIPT), str(folder), "--outfile", str(out_file), "--outtype", outtype],
            capture_output=True,
            text=True,
            env=env,
        )
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_folder}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def quantize(src: str | Path, dst: str | Path, gguf_type: str, threads: int = 2) -> float:
    """``llama_model_quantize`` (llama.cpp's own quantizer, default settings, no imatrix); returns seconds."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[gguf_type]
    params.nthread = threads
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) returned {status}")
    return time.perf_counter() - start


def llamacpp_logits(gguf_file: str | Path, seq_len: int, threads: int = 2, **options: Any) -> Logits:
    """A scorer that feeds a window's ids to llama.cpp on an empty cache (no BOS added) and returns
    the logits of every position. ``options`` go to ``llama_cpp.Llama`` (e.g. ``type_k``)."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_ctx=seq_len,
        n_batch=seq_len,
        n_ubatch=seq_len,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **options,
    )

    def logits(ids: Sequence[int]) -> np.ndarray:
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    logits.llama = llm  # type: ignore[attr-defined]  # keeps the model alive with the scorer
    return logits


def hf_logits(model: Any) -> Logits:
    """The same scorer for a transformers causal LM (one window, no padding)."""
    import torch

    def logits(ids: Sequence[int]) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0]
        return out.float().numpy()

    return logits


def window_nlls(logits: Logits, ids: Sequence[int], seq_len: int, stride: int | None = None) -> np.ndarray:
    """Per-token NLL (nats) of ``ids`` scored in quantcli's windows (``quantcli.measure.perplexity.windows``
    with ``stride`` defaulting to ``seq_len``: non-overlapping windows, each scored on every position
    but its first), with quantcli's float32 log-softmax."""
    import torch

    from quantcli.measure.perplexity import windows

    nlls = []
    for w in windows(len(ids), seq_len, stride or seq_len):
        fed = list(ids[w.begin : w.end])
        length = len(fed)
        scores = torch.from_numpy(logits(fed))
        log_q = torch.log_softmax(scores[length - w.scored - 1 : length - 1].float(), dim=-1)
        targets = torch.tensor(fed[length - w.scored :])
        nlls.append(-log_q.gather(-1, targets[:, None])[:, 0].numpy())
    return np.concatenate(nlls).astype(np.float64)


def perplexity(nlls: np.ndarray) -> float:
    return float(np.exp(nlls.mean()))


def gguf_sizes(gguf_file: str | Path) -> dict[str, Any]:
    """File bytes, tensor bytes, parameter count, bits per weight over all parameters, and the
    parameters held in each tensor type (llama.cpp keeps some tensors at other types than asked)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    params = sum(int(t.n_elements) for t in reader.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    file_bytes = Path(gguf_file).stat().st_size
    return {
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "parameters": params,
        "bits_per_weight": 8 * tensor_bytes / params,
        "file_bits_per_weight": 8 * file_bytes / params,
        "tensor_types": dict(sorted(types.items(), key=lambda item: -item[1])),
    }


def same_tensors(ours: Path, theirs: Path) -> tuple[int, int, int]:
    """``(identical, of the same type, all)``: tensors of ``ours`` with the same name, type, shape and
    bytes in ``theirs``, those with the same name and type, and all of them."""
    from gguf import GGUFReader

    def tensors(path: Path) -> dict[str, Any]:
        return {t.name: (t.tensor_type, tuple(t.shape), t.data.tobytes()) for t in GGUFReader(str(path)).tensors}

    a, b = tensors(ours), tensors(theirs)
    typed = [name for name in a if name in b and a[name][0] == b[name][0]]
    return sum(a[name] == b[name] for name in typed), len(typed), len(a)
