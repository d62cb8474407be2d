"""Token ids of a long text exactly as ``tokenizer(text)`` gives them, computed window by window.

A text is never tokenized in independent pieces: a SentencePiece tokenizer would add a dummy-prefix
"▁" to every piece, and a BPE merge can span a cut. Instead overlapping windows are tokenized, and a
window's tokens are kept only up to a point where its tokenization and the next window's agree (the
same tokens, ids and character spans, on both sides of that point, away from either window's
edges); from there on the next window's tokens are used. So a 4 GB file is read only as far as the
tokens asked for, and the ids equal those of the whole text tokenized at once (tested on a
SentencePiece and a byte-level BPE tokenizer in tests/sources/test_tokenstream.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

WINDOW_CHARS = 1 << 15
OVERLAP_CHARS = 1 << 11
AGREEING_TOKENS = 3  # tokens that must match, ending at the switch point
EDGE_CHARS = 64  # a switch point keeps this far from either window's edge

Token = tuple[int, int, int]  # (start char, end char, id), absolute offsets


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer(text)`` puts before and after the text's own tokens (e.g. ``[BOS]``, ``[]``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _encode(tokenizer: Any, text: str, offset: int) -> list[Token]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(offset + s, offset + e, i) for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"])]


def _switch_point(
    previous: list[Token], done: int, current: list[Token], low: int, high: int
) -> tuple[int, int] | None:
    """Indices (in ``previous``, in ``current``) of the first token from which ``current`` takes over:
    the ``AGREEING_TOKENS`` tokens before it agree in both, and it starts within ``[low, high]``."""
    where = {token: index for index, token in enumerate(previous)}
    for j in range(AGREEING_TOKENS, len(current)):
        start = current[j][0]
        if start > high:
            return None
        i = where.get(current[j])
        if start < low or i is None or i < done + AGREEING_TOKENS:
            continue
        if all(previous[i - k] == current[j - k] for k in range(1, AGREEING_TOKENS + 1)):
            return i, j
    return None


def text_ids(pieces: Iterable[str], tokenizer: Any, max_tokens: int | None = None) -> tuple[list[int], bool]:
    """``tokenizer("".join(pieces), add_special_tokens=False)["input_ids"][:max_tokens]``, reading
    ``pieces`` only as far as needed; also whether the whole text was tokenized."""
    if not getattr(tokenizer, "is_fast", False):  # no character offsets: tokenize the text at once
        ids = tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
        return list(ids[:max_tokens]) if max_tokens is not None else list(ids), max_tokens is None or len(
            ids
        ) <= max_tokens
    source: Iterator[str] = iter(pieces)
    text, base, ended = "", 0, False  # text holds the characters from absolute offset ``base`` on

    def read_to(end: int) -> None:
        nonlocal text, ended
        while not ended and base + len(text) < end:
            piece = next(source, None)
            ended = piece is None
            text += piece or ""

    read_to(WINDOW_CHARS)
    previous, done, start = _encode(tokenizer, text, 0), 0, 0  # window [start, start + len) tokens; done emitted
    ids: list[int] = []
    while not ended and (max_tokens is None or len(ids) < max_tokens):
        window_end = base + len(text)
        read_to(window_end + WINDOW_CHARS)
        next_start = max(start + 1, window_end - OVERLAP_CHARS)
        current = _encode(tokenizer, text[next_start - base :], next_start)
        found = _switch_point(previous, done, current, next_start + EDGE_CHARS, window_end - EDGE_CHARS)
        if found is None:  # no agreement in the overlap (e.g. a very long word): widen this window
            widened = _encode(tokenizer, text[start - base :], start)
            if widened[: done + 1] != previous[: done + 1]:
                raise RuntimeError("tokenization changed while widening a window; please report this text")
            previous = widened
            continue
        i, j = found
        ids.extend(token[2] for token in previous[done:i])
        previous, done, start = current, j, next_start
        text, base = text[start - base :], start
    ids.extend(token[2] for token in previous[done:])
    complete = ended and (max_tokens is None or len(ids) <= max_tokens)
    return (ids[:max_tokens] if max_tokens is not None else ids), complete
