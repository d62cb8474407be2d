"""A tokenizer that cannot encode text is refused before any work (issue 25, class 4).

transformers builds a tokenizer even from a partial copy of a model (no tokenizer.json): a handful of
special tokens, and every text encodes to nothing or to unknown tokens. A run with ``--no-eval`` would
ship it; one with evaluation would blame the dataset. So the tokenizer must cover at least half of the
model's embedding rows (models pad their tables, never by half) and encode a fixed English sample to
at least one known token per :data:`CHARS_PER_TOKEN` characters (byte-level tokenizers give one per
four to five; a working one never gives less than one per twelve).
"""

from __future__ import annotations

from typing import Any

from quantcli.errors import ModelLoadError

SAMPLE = 'Once upon a time, a little girl named Lily found 3 shiny stones by the river. She said: "Look, Mom!"'
CHARS_PER_TOKEN = 12


def check_tokenizer(tokenizer: Any, rows: int, source: str) -> None:
    """Refuse a tokenizer far smaller than the model's ``rows`` embedding rows, or one that cannot encode text."""
    size = len(tokenizer)
    fix = "Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) next to its weights."
    if size * 2 < rows:
        raise ModelLoadError(
            f"the tokenizer of {source} has {size} tokens but the model's embedding has {rows} rows: it is not the"
            f" model's tokenizer (a partial copy?). {fix}"
        )
    try:
        ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    except Exception as error:
        raise ModelLoadError(
            f"the tokenizer of {source} cannot encode text ({type(error).__name__}: {error}). {fix}"
        ) from None
    known = [token for token in ids if token != tokenizer.unk_token_id]
    if len(known) * CHARS_PER_TOKEN < len(SAMPLE):
        raise ModelLoadError(
            f"the tokenizer of {source} encodes a {len(SAMPLE)}-character English sample to {len(known)} known"
            " token(s):"
            f" it cannot encode text. {fix}"
        )
