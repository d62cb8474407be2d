"""Dataset specs to token ids. Calibration and evaluation text are kept apart.

A dataset spec is one of:
  * ``tinystories:calib`` / ``tinystories:eval``: the embedded TinyStories text, split in two halves
    at a paragraph boundary (calibration never sees evaluation text). Its blank lines separate
    paragraphs, and story boundaries are not marked, so it is plain text, not documents;
  * a local ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file, read through ``datasets``: one
    document per row, from the ``text`` column or ``--text-column``;
  * any other local file: plain UTF-8 text, whatever its extension (``.txt``, ``.raw``, none);
  * a Hub dataset ``path[:config[:split]]``, e.g. ``wikitext:wikitext-2-raw-v1:train`` (rows).

Protocols (README "Perplexity: how it is measured"): ``stream`` is the text (rows joined by
"\\n\\n") tokenized once, token for token as ``tokenizer(text)``; ``documents`` tokenizes each
document on its own. Documents come only from rows or an explicit ``--doc-separator``: a blank line
is not a document boundary.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantcli.errors import DatasetError, InputError, option
from quantcli.limits import check_dataset_file
from quantcli.sources.causes import quiet_datasets, root_cause
from quantcli.sources.tokenstream import special_ids, text_ids

if TYPE_CHECKING:
    import torch

EMBEDDED_TEXT = Path(__file__).parent.parent / "assets" / "tinystories" / "tinystories_val.txt"
EMBEDDED_SPLITS = ("calib", "eval")
ROW_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
READ_BYTES = 1 << 20
ROW_JOINER = "\n\n"


@dataclass(frozen=True)
class TextSource:
    """The text of one dataset spec: rows (``documents``), an in-memory ``text``, or a UTF-8 file
    at ``path`` read lazily; ``separator`` splits a text into documents."""

    spec: str
    documents: list[str] | None = None
    text: str | None = None
    path: Path | None = None
    separator: str | None = None

    @property
    def has_documents(self) -> bool:
        return self.documents is not None or self.separator is not None

    def pieces(self) -> Iterator[str]:
        """The stream's text in pieces: the file or text, or the rows joined by a blank line."""
        if self.path is not None:
            yield from _utf8_pieces(self.path, self.spec)
        elif self.text is not None:
            yield from _chunks(self.text)
        else:  # a 30 MB row is read in pieces too: the stream tokenizes only as far as --max-tokens needs
            for index, row in enumerate(self.documents or []):
                yield from _chunks(row if index == 0 else ROW_JOINER + row)

    def check_protocol(self, protocol: str) -> None:
        """Refuse ``documents`` for text that marks no documents."""
        if protocol == "documents" and not self.has_documents:
            raise InputError(
                f"{option('eval.protocol', 'documents')} needs documents, and {self.spec} is plain text, where a blank "
                "line is not a"
                f" document boundary. Pass {option('eval.doc_separator', 'STRING')}, use rows "
                f"(.jsonl/.csv/.parquet/Hub), or {option('eval.protocol', 'stream')}."
            )

    def iter_documents(self) -> Iterator[str]:
        """The non-blank documents: rows, or the text cut at ``separator``."""
        self.check_protocol("documents")
        if self.documents is not None:
            yield from (d for d in self.documents if d.strip())
            return
        rest = ""
        for piece in self.pieces():
            *done, rest = (rest + piece).split(self.separator)
            yield from (d for d in done if d.strip())
        if rest.strip():
            yield rest


def _chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), READ_BYTES):
        yield text[start : start + READ_BYTES]


def _utf8_pieces(path: Path, spec: str, limit: int | None = None) -> Iterator[str]:
    """The file's text, decoded strictly (bytes kept exactly: no newline translation), in pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as handle:
            while limit is None or offset < limit:
                block = handle.read(READ_BYTES)
                try:
                    yield decoder.decode(block, final=not block)
                except UnicodeDecodeError as error:
                    raise InputError(
                        f"{spec} is not UTF-8 text: invalid byte at offset {offset + error.start}. Convert it to UTF-8."
                    ) from None
                if not block:
                    return
                offset += len(block)
    except OSError as error:
        raise DatasetError(f"cannot read {spec}: {error.strerror or error}. Check the file's permissions.") from None


def _embedded(split: str) -> str:
    paragraphs = [s.strip() for s in EMBEDDED_TEXT.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    half = len(paragraphs) // 2
    return ROW_JOINER.join(paragraphs[:half] if split == "calib" else paragraphs[half:])


def _text_column(dataset: Any, spec: str, text_column: str | None) -> str:
    wanted = text_column or "text"
    if wanted in dataset.column_names:
        return wanted
    columns = ", ".join(dataset.column_names)
    if text_column:
        raise InputError(
            f"dataset {spec} has no column '{text_column}' (columns: {columns}). Pass one of them to "
            f"{option('text_column')}."
        )
    raise InputError(
        f"dataset {spec} has no 'text' column (columns: {columns}). Name the column with {option('text_column')}."
    )


def _rows(
    spec: str, path: str, name: str | None, split: str, text_column: str | None, data_files: str | None = None
) -> list[str]:
    import datasets

    quiet_datasets()
    try:
        if data_files:
            dataset = datasets.load_dataset(path, data_files=data_files, split="train")
        else:
            dataset = datasets.load_dataset(path, name, split=split)
    except FileNotFoundError as error:
        raise DatasetError(
            f"dataset {spec} was not found ({error}). Pass a local file, or warm the HF datasets cache."
        ) from None
    except (ConnectionError, OSError) as error:
        raise DatasetError(
            f"cannot load dataset {spec}: not in the local cache and the Hub is unreachable"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}. Pass a local "
            ".txt/.jsonl/.parquet file."
        ) from error
    except ValueError as error:
        raise DatasetError(f"cannot read dataset {spec}: {str(error).splitlines()[0]}") from None
    except Exception as error:
        raise DatasetError(f"cannot read dataset {spec}: {root_cause(error)}") from None
    column = _text_column(dataset, spec, text_column)
    texts = dataset[column]
    bad = [index for index, text in enumerate(texts) if not isinstance(text, str)]
    if bad:  # never dropped without a word
        raise DatasetError(
            f"dataset {spec}: {len(bad):,} of {len(texts):,} rows have no text in column '{column}' (missing or not a"
            f" string; the first is row {bad[0] + 1}). Fix or remove those rows, or name another column with"
            f" {option('calibration.text_column')}."
        )
    return list(texts)


def read_documents(spec: str, text_column: str | None = None, doc_separator: str | None = None) -> TextSource:
    """Open ``spec`` (see the module docstring) and check it can be read, before any model loads.
    A plain text file is checked on its first MiB and read lazily later."""
    path = Path(spec).expanduser()

    check_dataset_file(path, spec)
    if path.is_file():
        builder = ROW_BUILDERS.get(path.suffix.lower())
        if builder:
            source = TextSource(spec, documents=_rows(spec, builder, None, "train", text_column, data_files=str(path)))
        else:
            head = "".join(_utf8_pieces(path, spec, limit=READ_BYTES))
            if not head.strip() and path.stat().st_size <= READ_BYTES:
                raise DatasetError(
                    f"dataset {spec} holds no text. Point it at a file or split with non-empty documents."
                )
            source = TextSource(spec, path=path, separator=doc_separator)
    elif spec.startswith(("tinystories:", "quantcli:")) or spec == "tinystories":
        split = spec.split(":")[-1] if ":" in spec else "eval"
        if split not in EMBEDDED_SPLITS:
            raise InputError(f"the embedded TinyStories text has splits {', '.join(EMBEDDED_SPLITS)}, not '{split}'.")
        source = TextSource(spec, text=_embedded(split), separator=doc_separator)
    elif spec.startswith((".", "/", "~")) or (path.suffix and ":" not in spec):
        raise InputError(f"dataset file {spec} does not exist. Check the path.")
    else:
        parts = spec.split(":")
        if len(parts) > 3 or not all(parts):
            raise InputError(
                f"dataset spec '{spec}' is not of the form path[:config[:split]], e.g. "
                "wikitext:wikitext-2-raw-v1:train."
            )
        name = parts[1] if len(parts) > 1 else None
        split = parts[2] if len(parts) > 2 else "train"
        source = TextSource(spec, documents=_rows(spec, parts[0], name, split, text_column))
    if source.documents is not None and not any(d.strip() for d in source.documents):
        raise DatasetError(f"dataset {spec} holds no text. Point it at a file or split with non-empty documents.")
    if doc_separator is not None and source.documents is not None:
        raise InputError(
            f"{option('eval.doc_separator')} splits plain text, and {spec} already has one document per row. Drop "
            f"{option('eval.doc_separator')}."
        )
    return source


def _specials(tokenizer: Any, bos: str) -> tuple[list[int], list[int]]:
    """The ids before and after each sequence's text: the tokenizer's own (``auto``), BOS, or none."""
    if bos == "auto":
        return special_ids(tokenizer)
    if bos == "start":
        if tokenizer.bos_token_id is None:
            raise InputError(
                f"{option('eval.bos', 'start')}: this tokenizer has no BOS token. Use {option('eval.bos', 'auto')} or "
                f"{option('eval.bos', 'none')}."
            )
        return [tokenizer.bos_token_id], []
    return [], []


def _with_specials(texts: Iterator[str] | list[str], tokenizer: Any, bos: str, max_tokens: int | None) -> list[int]:
    """``tokenizer(text)`` ids (specials as ``bos`` says), cut to ``max_tokens``."""
    prefix, suffix = _specials(tokenizer, bos)
    body, complete = text_ids(texts, tokenizer, None if max_tokens is None else max(max_tokens - len(prefix), 0))
    ids = prefix + body + (suffix if complete else [])
    return ids[:max_tokens] if max_tokens is not None else ids


def token_sequences(
    source: TextSource, tokenizer: Any, protocol: str = "stream", bos: str = "auto", max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Token ids to score, at most ``max_tokens`` in all.

    ``stream``: one sequence, the text (rows joined by a blank line) tokenized once, as
    ``tokenizer(text)`` (``bos="auto"``), after one BOS (``"start"``) or without specials (``"none"``).
    ``documents``: one sequence per document, each tokenized that way (whole documents first, the
    last one cut); windows never cross documents, as in lm-eval-harness' rolling perplexity.
    """
    import torch

    if protocol == "stream":
        sequences = [_with_specials(source.pieces(), tokenizer, bos, max_tokens)]
    else:
        sequences, count = [], 0
        for document in source.iter_documents():
            ids = _with_specials([document], tokenizer, bos, None if max_tokens is None else max_tokens - count)
            sequences.append(ids)
            count += len(ids)
            if max_tokens is not None and count >= max_tokens:
                break
    return [torch.tensor(ids, dtype=torch.long) for ids in sequences if ids]


def calibration_batch(source: TextSource, tokenizer: Any, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[samples, seq_len]`` windows drawn at seeded random offsets from the text's stream (its
    first ``max(2^20, 4 * samples * seq_len)`` tokens, so a huge file is not read whole)."""
    import torch

    stream = token_sequences(source, tokenizer, "stream", "auto", max(1 << 20, 4 * samples * seq_len))[0]
    if stream.numel() < seq_len:
        raise DatasetError(
            f"calibration dataset {source.spec} has {stream.numel()} tokens, fewer than one window of"
            f" {option('calibration.seq_len', seq_len)}. Use more text or a shorter {option('calibration.seq_len')}."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
