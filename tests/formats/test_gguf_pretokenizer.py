"""Byte-level BPE pre-tokenizers in GGUF output: which llama.cpp name each tokenizer.json gets, the
refusal for the others, and llama.cpp itself tokenizing as the HF tokenizer does for each name, with
SmolLM2's vocabulary and merges under each pre-tokenizer (a tiny random Llama carries them; the
llama.cpp checks skip without `make llama-cpp`, all skip without `make smollm2`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import quantcli
from quantcli.config.quantize import QuantizeConfig
from quantcli.errors import UnavailableError
from quantcli.formats.gguf.metadata import LLAMA3_SPLIT, llamacpp_pre_tokenizer
from quantcli.formats.gguf.writer import gguf_file
from tests.support.models import WIKITEXT, smollm2_folder

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTES_ONLY = {**BYTE_LEVEL, "use_regex": False}
DIGITS = {"type": "Digits", "individual_digits": True}
LLAMA3 = {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
# llama.cpp name: (pre_tokenizer, ignore_merges) as the Hub's GPT-2, SmolLM2 and Llama 3 tokenizers spell them
VARIANTS = {
    "gpt-2": (BYTE_LEVEL, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [DIGITS, BYTE_LEVEL]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [LLAMA3, BYTES_ONLY]}, True),
}
# Digits, contractions in both cases, runs of spaces, tabs and newlines: where the three differ.
SAMPLE = (
    "In 1987, 12,345 people paid $3.14159 each.\nI'LL say DON'T; she'll, they're, we've\n\n"
    "   three  spaces\tand\ttabs 2024-12-02\r\n"
)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_hub_spelling_gets_its_llamacpp_name(name):
    pre, ignore_merges = VARIANTS[name]
    assert llamacpp_pre_tokenizer(pre, None, ignore_merges) == name


def test_other_pre_tokenizers_are_refused_with_the_names_that_work():
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    with pytest.raises(UnavailableError) as error:
        llamacpp_pre_tokenizer(metaspace, None, False)
    assert str(error.value) == (
        "GGUF output writes byte-level BPE tokenizers whose pre-tokenizer llama.cpp has (gpt-2, smollm, llama-bpe) and "
        "SentencePiece-style"
        " ones; this tokenizer's pre-tokenizer is "
        '{"prepend_scheme": "always", "replacement": "▁", "split": true, "type": "Metaspace"}.'
    )


def test_llama3_split_without_ignore_merges_and_a_normalizer_are_refused():
    pre, _ = VARIANTS["llama-bpe"]
    with pytest.raises(UnavailableError, match=r"pre-tokenizer is .*\\p\{N\}\{1,3\}.*, ignore_merges false\.$"):
        llamacpp_pre_tokenizer(pre, None, False)
    with pytest.raises(UnavailableError, match=r"pre-tokenizer is ByteLevel\(use_regex\), with a normalizer\.$"):
        llamacpp_pre_tokenizer(BYTE_LEVEL, {"type": "NFC"}, False)


@pytest.fixture(scope="module")
def smollm2_tokenizer_files():
    folder = smollm2_folder()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 absent at {folder}: run `make smollm2` or set QUANTCLI_SMOLLM2")
    return folder


def tiny_llama(folder: Path, source: Path, name: str) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer files, its pre-tokenizer replaced by ``name``'s.
    SmolLM2's vocabulary holds single digits only, so three digit merges are added: without them
    splitting the digits first (``smollm``) would change no id."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir()
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, folder / path.name)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"], data["model"]["ignore_merges"] = VARIANTS[name]
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    for pair in (("Ġ", "1"), ("1", "9"), ("8", "7")):
        vocab["".join(pair)] = 1 + max([*vocab.values(), *(item["id"] for item in data["added_tokens"])])
        merges.append(list(pair) if isinstance(merges[0], list) else " ".join(pair))
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=max(vocab.values()) + 1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_llamacpp_tokenizes_as_hf_under_each_pre_tokenizer(smollm2_tokenizer_files, tmp_path):
    from transformers import AutoTokenizer

    from tests.support.gguf_harness import llama_cpp_module

    try:
        llama_cpp = llama_cpp_module()
    except ImportError as error:
        pytest.skip(f"llama.cpp unavailable: {error}")
    text = SAMPLE + (WIKITEXT / "wiki.valid.eval.txt").read_text(encoding="utf-8")[:20000]
    hf_ids = {}
    for name in VARIANTS:
        folder = tiny_llama(tmp_path / name, smollm2_tokenizer_files, name)
        quantcli.quantize(
            QuantizeConfig(
                bits=8,
                model=str(folder),
                method="rtn",
                output=tmp_path / f"{name}-gguf",
                eval=None,
                format="gguf",
                gguf_type="Q8_0",
            )
        )
        llm = llama_cpp.Llama(model_path=str(gguf_file(tmp_path / f"{name}-gguf")), vocab_only=True, verbose=False)
        assert llm.metadata["tokenizer.ggml.pre"] == name
        hf_ids[name] = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == hf_ids[name], name
    assert len({tuple(ids) for ids in hf_ids.values()}) == 3  # the text tells the three apart
