"""A text stream is the text tokenized as one string: ids equal ``tokenizer(text)``, token for token,
for a SentencePiece and byte-level BPE tokenizers, however the text is cut into windows."""

from __future__ import annotations

import json

import pytest

from quantcli.errors import InputError
from quantcli.sources import tokenstream
from quantcli.sources.datasets import TextSource, read_documents, token_sequences
from quantcli.sources.models import EMBEDDED_MODEL
from tests.support.models import SMOLLM2, WIKI_CALIB, WIKI_EVAL


def trained_byte_level_bpe():
    """A real byte-level BPE (GPT-2 style pre-tokenizer, 2,000 merges' vocab) trained on WikiText-2 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(WIKI_CALIB)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(
    scope="module", params=["sentencepiece-stories260K", "byte-level-bpe-trained", "byte-level-bpe-smollm2"]
)
def tokenizer(request):
    from transformers import AutoTokenizer

    if request.param == "sentencepiece-stories260K":
        return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    if request.param == "byte-level-bpe-trained":
        return trained_byte_level_bpe()
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 not found at {SMOLLM2} (set QUANTCLI_SMOLLM2)")
    return AutoTokenizer.from_pretrained(SMOLLM2)


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 1,500 characters: a 40 KB text is cut at ~25 switch points."""
    monkeypatch.setattr(tokenstream, "WINDOW_CHARS", 1500)
    monkeypatch.setattr(tokenstream, "OVERLAP_CHARS", 400)


TEXTS = {
    "wikitext": WIKI_EVAL.read_text(encoding="utf-8")[:40_000],
    "tinystories": "".join(read_documents("tinystories:eval").pieces())[:40_000],
    "unicode-and-long-words": ("Grüße, 東京 — naïve café ☕ " * 40 + "x" * 3000 + "\n\n\n  spaced   out\t\ttabs\n") * 4,
}


@pytest.mark.parametrize("name", TEXTS)
def test_stream_ids_equal_the_text_tokenized_at_once(tokenizer, small_windows, name):
    text = TEXTS[name]
    source = TextSource("text", text=text)
    expected = tokenizer(text)["input_ids"]
    assert token_sequences(source, tokenizer, "stream", "auto")[0].tolist() == expected
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert token_sequences(source, tokenizer, "stream", "none")[0].tolist() == plain
    if tokenizer.bos_token_id is not None:
        assert token_sequences(source, tokenizer, "stream", "start")[0].tolist() == [tokenizer.bos_token_id, *plain]
    assert token_sequences(source, tokenizer, "stream", "auto", 1234)[0].tolist() == expected[:1234]


def test_stream_of_a_file_reads_only_what_max_tokens_needs(tmp_path, small_windows):
    """A file whose bad byte lies far past the text needed is fine; reading it whole is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    text = WIKI_EVAL.read_text(encoding="utf-8")
    path = tmp_path / "wiki.raw"
    path.write_bytes(text.encode() * 6 + b"\xff tail")  # 3 MB, then one byte that is not UTF-8
    source = read_documents(str(path))
    assert token_sequences(source, tokenizer, max_tokens=2000)[0].tolist() == tokenizer(text)["input_ids"][:2000]
    with pytest.raises(
        InputError,
        match=rf"^{path} is not UTF-8 text: invalid byte at offset {len(text.encode()) * 6}\. Convert it to UTF-8\.$",
    ):
        token_sequences(source, tokenizer)


def test_rows_are_joined_by_a_blank_line_or_kept_as_documents(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    rows = ["The cat sat.", "", "It was warm.\n\nThe end."]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"story": row}) + "\n" for row in rows))
    source = read_documents(str(path), text_column="story")
    assert source.documents == rows
    stream = token_sequences(source, tokenizer)
    assert [s.tolist() for s in stream] == [tokenizer("\n\n".join(rows))["input_ids"]]  # the HF perplexity guide's join
    documents = token_sequences(source, tokenizer, "documents", "start")
    assert [d.tolist() for d in documents] == [
        [1, *tokenizer(r, add_special_tokens=False)["input_ids"]] for r in rows if r
    ]


def test_a_separator_makes_documents_of_plain_text(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    path = tmp_path / "stories"
    path.write_text("One day a dog ran.\n\nIt was fast.<|endoftext|>A bird sang.<|endoftext|>")
    with pytest.raises(
        InputError,
        match="is plain text, where a blank line is not a document boundary. Pass eval.doc_separator='STRING'",
    ):
        token_sequences(read_documents(str(path)), tokenizer, "documents")
    documents = token_sequences(
        read_documents(str(path), doc_separator="<|endoftext|>"), tokenizer, "documents", "auto"
    )
    assert [d.tolist() for d in documents] == [
        tokenizer("One day a dog ran.\n\nIt was fast.")["input_ids"],
        tokenizer("A bird sang.")["input_ids"],
    ]
