"""Dataset slices to token tensors. Calibration and evaluation text are kept apart.

A dataset spec is one of:
  * ``tinystories:calib`` / ``tinystories:eval``: the embedded TinyStories text, split in two halves
    at a story boundary (calibration never sees evaluation text);
  * a local ``.txt``, ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file, read through ``datasets``;
  * a Hub dataset ``path[:config[:split]]``, e.g. ``wikitext:wikitext-2-raw-v1:train``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli.errors import DatasetError, InputError

if TYPE_CHECKING:
    import torch

EMBEDDED_TEXT = Path(__file__).parent / "assets" / "tinystories" / "tinystories_val.txt"
EMBEDDED_SPLITS = ("calib", "eval")
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """Documents read from one dataset spec, with what was read recorded for reports."""

    spec: str
    documents: list[str]


def _embedded(split: str) -> list[str]:
    stories = [s.strip() for s in EMBEDDED_TEXT.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    half = len(stories) // 2
    return stories[:half] if split == "calib" else stories[half:]


def _text_column(dataset: Any, spec: str) -> str:
    if "text" in dataset.column_names:
        return "text"
    for name, feature in dataset.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return name
    raise DatasetError(f"dataset {spec} has no text column (columns: {', '.join(dataset.column_names)}). Add a 'text' column.")


def _from_datasets(spec: str, path: str, name: str | None, split: str, data_files: str | None = None) -> list[str]:
    import datasets

    from quantcli.causes import quiet_datasets, root_cause

    quiet_datasets()
    try:
        if data_files:
            dataset = datasets.load_dataset(path, data_files=data_files, split="train")
        else:
            dataset = datasets.load_dataset(path, name, split=split)
    except FileNotFoundError as error:
        raise DatasetError(f"dataset {spec} was not found ({error}). Pass a local file, or warm the HF datasets cache.") from None
    except (ConnectionError, OSError) as error:
        raise DatasetError(
            f"cannot load dataset {spec}: not in the local cache and the Hub is unreachable"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}. Pass a local .txt/.jsonl/.parquet file."
        ) from error
    except ValueError as error:
        raise DatasetError(f"cannot read dataset {spec}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise DatasetError(f"cannot read dataset {spec}: {root_cause(error)}") from None
    column = _text_column(dataset, spec)
    return [text for text in dataset[column] if isinstance(text, str) and text.strip()]


def read_documents(spec: str) -> TextSource:
    """Read the non-empty documents of ``spec`` (see the module docstring for the forms)."""
    path = Path(spec).expanduser()
    from quantcli.limits import check_dataset_file

    check_dataset_file(path, spec)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"{spec}: unsupported file type '{path.suffix}'. Use .txt, .jsonl, .json, .csv or .parquet.")
        if builder == "text":
            text = path.read_text(encoding="utf-8", errors="replace")
            documents = [d.strip() for d in text.split("\n\n") if d.strip()]
        else:
            documents = _from_datasets(spec, builder, None, "train", data_files=str(path))
    elif spec.startswith(("tinystories:", "quantcli:")) or spec == "tinystories":
        split = spec.split(":")[-1] if ":" in spec else "eval"
        if split not in EMBEDDED_SPLITS:
            raise InputError(f"the embedded TinyStories text has splits {', '.join(EMBEDDED_SPLITS)}, not '{split}'.")
        documents = _embedded(split)
    elif spec.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise InputError(f"dataset file {spec} does not exist. Check the path.")
    else:
        parts = spec.split(":")
        if len(parts) > 3 or not all(parts):
            raise InputError(f"dataset spec '{spec}' is not of the form path[:config[:split]], e.g. wikitext:wikitext-2-raw-v1:train.")
        name = parts[1] if len(parts) > 1 else None
        split = parts[2] if len(parts) > 2 else "train"
        documents = _from_datasets(spec, parts[0], name, split)
    if not documents:
        raise DatasetError(f"dataset {spec} holds no text. Point it at a file or split with non-empty documents.")
    return TextSource(spec, documents)


def token_sequences(documents: list[str], tokenizer: Any, bos: str, max_tokens: int | None = None) -> list["torch.Tensor"]:
    """Token ids to score, at most ``max_tokens`` in all (whole documents first, the last one cut).

    ``bos="document"``: one sequence per document, each starting with BOS (how stories260K and
    most LMs were trained; windows never cross documents, as in lm-eval-harness' rolling
    perplexity). ``"start"``: documents joined by a blank line into one stream with one BOS (the
    transformers "perplexity of fixed-length models" recipe). ``"none"``: that stream without BOS.
    """
    import torch

    bos_id = tokenizer.bos_token_id
    if bos != "none" and bos_id is None:
        bos = "none"
    sequences: list[list[int]] = []
    count = 0
    for index, document in enumerate(documents):
        text = document if bos == "document" or index == 0 else "\n\n" + document
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos == "document" or (bos == "start" and index == 0):
            ids = [bos_id, *ids]
        if bos == "document" or not sequences:
            sequences.append([])
        if max_tokens is not None:
            ids = ids[: max_tokens - count]
        sequences[-1].extend(ids)
        count += len(ids)
        if max_tokens is not None and count >= max_tokens:
            break
    return [torch.tensor(ids, dtype=torch.long) for ids in sequences if ids]


def token_stream(documents: list[str], tokenizer: Any) -> "torch.Tensor":
    """All documents as one BOS-per-document stream (calibration windows are cut from it)."""
    import torch

    return torch.cat(token_sequences(documents, tokenizer, "document"))


def calibration_batch(source: TextSource, tokenizer: Any, samples: int, seq_len: int, seed: int) -> "torch.Tensor":
    """``[samples, seq_len]`` windows drawn at seeded random offsets from the BOS-per-document stream."""
    import torch

    stream = token_stream(source.documents, tokenizer)
    if stream.numel() < seq_len:
        raise DatasetError(
            f"calibration dataset {source.spec} has {stream.numel()} tokens, fewer than one window of"
            f" --seq-len {seq_len}. Use more text or a shorter --seq-len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
