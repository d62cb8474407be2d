"""GGUF metadata quantcli writes besides the tensors: the architecture's hyperparameters and the
tokenizer (merges or SentencePiece-style scores, token types, special tokens, chat template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.errors import UnavailableError


def write_hyperparameters(writer: Any, config: Any, file_type: str) -> None:
    """The architecture's hyperparameters (context, widths, heads, norms, rotary, experts) and
    ``general.file_type``."""
    import gguf

    hidden, heads = config.hidden_size, config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    writer.add_head_count(heads)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.model_type == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    rope = getattr(config, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": getattr(config, "rope_theta", 10000.0),
    }
    if rope.get("rope_type", "default") != "default":
        raise UnavailableError(
            f"GGUF output writes plain rotary embeddings; this model's rope_type is {rope['rope_type']}."
        )
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:  # llama.cpp reads an expert's width from feed_forward_length unless this is given
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)


# How a byte-level BPE cuts text before merging, as the regexes it applies in turn, and the llama.cpp
# pre-tokenizer (``tokenizer.ggml.pre``) that applies the same ones (llama-vocab.cpp). A behaviour, not
# a model: any tokenizer whose pre-tokenizer spells these steps gets the name.
BYTE_LEVEL = "ByteLevel(use_regex)"  # GPT-2's built-in pattern
DIGITS = "Digits(individual)"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501 - the regex as llama.cpp spells it
PRE_TOKENIZERS = {  # steps: (llama.cpp name, whether llama.cpp takes a whole-word vocab entry before merging)
    (BYTE_LEVEL,): ("gpt-2", False),
    (DIGITS, BYTE_LEVEL): ("smollm", False),  # SmolLM/StarCoder: every digit alone, then GPT-2's pattern
    (LLAMA3_SPLIT,): ("llama-bpe", True),  # Llama 3: its split, then bytes mapped without a regex
}


def llamacpp_pre_tokenizer(pre: dict, normalizer: dict | None, ignore_merges: bool) -> str:
    """The llama.cpp pre-tokenizer name that cuts text as this tokenizer.json's ``pre_tokenizer`` does."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    spelled = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            spelled += [BYTE_LEVEL] if step.get("use_regex", True) else []
        elif kind == "Digits" and step.get("individual_digits"):
            spelled.append(DIGITS)
        elif (
            kind == "Split"
            and step.get("behavior") == "Isolated"
            and not step.get("invert")
            and "Regex" in (step.get("pattern") or {})
        ):
            spelled.append(step["pattern"]["Regex"])
        else:
            spelled.append(json.dumps(step, sort_keys=True, ensure_ascii=False))
    known = PRE_TOKENIZERS.get(tuple(spelled))
    if known is None or normalizer or known[1] != ignore_merges:
        names = ", ".join(name for name, _ in PRE_TOKENIZERS.values())
        raise UnavailableError(
            f"GGUF output writes byte-level BPE tokenizers whose pre-tokenizer llama.cpp has ({names}) and "
            "SentencePiece-style ones;"
            " this tokenizer's pre-tokenizer is "
            f"{' then '.join(spelled) or 'none'}{', with a normalizer' if normalizer else ''}"
            f"{', ignore_merges ' + str(ignore_merges).lower() if known and known[1] != ignore_merges else ''}."
        )
    return known[0]


def write_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """The Hugging Face tokenizer in ``folder`` as GGUF metadata: SentencePiece-style BPE (byte fallback,
    Llama) as llama.cpp's ``llama`` model with scores from the merge ranks, byte-level BPE (GPT-2,
    SmolLM2, Llama 3) as its ``gpt2`` model with the merges and the matching pre-tokenizer; special
    tokens, BOS/EOS flags and the chat template through ``gguf.SpecialVocab``."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UnavailableError(
            f"GGUF output writes BPE tokenizers (SentencePiece-style or byte-level); this one is {model.get('type')}."
        )
    sentencepiece = bool(model.get("byte_fallback"))
    pre_name = (
        "default"
        if sentencepiece
        else llamacpp_pre_tokenizer(pre, data.get("normalizer"), bool(model.get("ignore_merges")))
    )
    tokens = {token_id: text for text, token_id in model["vocab"].items()}
    added = {item["id"]: item for item in data.get("added_tokens", [])}
    tokens.update({token_id: item["content"] for token_id, item in added.items()})
    count = max(vocab_size, max(tokens) + 1)
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model.get("merges", [])]
    rank = {merge.replace(" ", ""): -float(index) for index, merge in reversed(list(enumerate(merges)))}
    texts, scores, types = [], [], []
    for token_id in range(count):
        text = tokens.get(token_id, f"[PAD{token_id}]")
        item = added.get(token_id)
        if item is not None:
            kind = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
            kind = gguf.TokenType.UNKNOWN if text == model.get("unk_token") else kind
        elif token_id not in tokens:
            kind = gguf.TokenType.UNUSED
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        texts.append(text)
        scores.append(rank.get(text, 0.0) if sentencepiece else 0.0)
        types.append(kind)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(texts)
    if sentencepiece:  # llama.cpp's SentencePiece tokenizer merges by score; its BPE one reads the merges
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("gguf.vocab").setLevel(
        logging.ERROR
    )  # its notes on tokenizer.json's pair template are not ours to show
    special = gguf.SpecialVocab(folder, load_merges=not sentencepiece, n_vocab=count)
    hf = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # the tokenizer quantcli just saved
    special.add_special_token["bos"] = hf.bos_token_id is not None and hf("a")["input_ids"][:1] == [
        hf.bos_token_id
    ]  # what HF does
    special.add_to_gguf(writer, quiet=True)
