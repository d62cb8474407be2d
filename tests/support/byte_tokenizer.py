"""Tokenizers for models built from configs in the tests (random weights, no tokenizer of their own)."""

from __future__ import annotations

from typing import Any


def byte_level_tokenizer(size: int) -> Any:
    """A GPT-2 style byte-level tokenizer with ``size`` tokens: the 256 byte symbols (so any text encodes), the
    end-of-text token, and unused filler entries up to the model's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab.update({f"<|unused{index}|>": index for index in range(len(vocab), size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
