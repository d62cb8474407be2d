"""quantcli's perplexity against the transformers docs' "perplexity of fixed-length models" loop,
written out here: on plain text files, for a SentencePiece and byte-level BPE tokenizers."""

from __future__ import annotations

import math

import pytest
import torch

from quantcli.checkpoint.load import load
from quantcli.config.quantize import EvalConfig
from quantcli.measure.evaluation import evaluate
from quantcli.measure.perplexity import evaluate_sequences
from quantcli.sources.datasets import read_documents, token_sequences
from tests.sources.test_tokenstream import SMOLLM2, WIKI_EVAL, trained_byte_level_bpe


@pytest.fixture(scope="module")
def stories(stories_path):
    model, tokenizer, _ = load(stories_path, "cpu")
    stream = token_sequences(read_documents("tinystories:eval"), tokenizer, max_tokens=1500)
    return model, stream


def reference_nll(model, encodings: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """https://huggingface.co/docs/transformers/perplexity, with the loss weighted by its real token count."""
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += outputs.loss.double().item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("seq_len,stride", [(256, 256), (256, 128), (200, 64)])
def test_matches_transformers_recipe(stories, seq_len, stride):
    model, stream = stories
    assert len(stream) == 1 and stream[0][0].item() == 1  # one stream, one BOS at the start
    ours = evaluate_sequences(model, stream, seq_len, stride, batch_size=4)
    reference, scored = reference_nll(model, stream[0][None], seq_len, stride)
    assert ours.tokens_scored == scored  # stride == seq_len leaves each window's first token unscored, as the docs do
    assert abs(ours.nll - reference) < 1e-4
    assert abs(ours.perplexity - math.exp(reference)) / math.exp(reference) < 1e-4


def test_interval_and_self_kl(stories):
    model, stream = stories
    result = evaluate_sequences(model, stream, 128, 128, base_model=model)
    low, high = result.ci95
    assert low < result.perplexity < high
    assert high / low < 1.5  # ~1.5k tokens give a tight interval
    assert abs(result.kl_divergence) < 1e-6
    assert result.top1_agreement == 1.0


def plain_transformers_perplexity(
    folder: str, text: str, max_tokens: int, max_length: int, stride: int
) -> tuple[float, int]:
    """The HF guide as a user runs it: load, ``tokenizer(text)``, cut to ``max_tokens``, slide."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    encodings = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    nll, scored = reference_nll(model, encodings, max_length, stride)
    return math.exp(nll), scored


@pytest.fixture(scope="module")
def byte_level_model(tmp_path_factory) -> str:
    """A small random Llama with a byte-level BPE tokenizer trained on WikiText-2 (runs everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = trained_byte_level_bpe()
    folder = tmp_path_factory.mktemp("byte-level-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("model_name", ["stories260K-sentencepiece", "byte-level-bpe", "smollm2-byte-level-bpe"])
@pytest.mark.parametrize("seq_len,stride", [(256, 256), (256, 96)])
def test_plain_text_perplexity_equals_plain_transformers(request, stories_path, model_name, seq_len, stride):
    if model_name == "smollm2-byte-level-bpe" and not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"SmolLM2 not found at {SMOLLM2} (set QUANTCLI_SMOLLM2)")
    folder = {"stories260K-sentencepiece": stories_path, "smollm2-byte-level-bpe": str(SMOLLM2)}.get(model_name)
    folder = folder or request.getfixturevalue("byte_level_model")
    tokens = 1024 if model_name.startswith("smollm2") else 3000
    ours = evaluate(folder, EvalConfig(str(WIKI_EVAL), seq_len, stride, tokens), device="cpu")
    expected, scored = plain_transformers_perplexity(
        folder, WIKI_EVAL.read_text(encoding="utf-8"), tokens, seq_len, stride
    )
    assert ours["tokens_scored"] == scored
    assert abs(ours["perplexity"] - expected) / expected < 1e-4
    assert ours["settings"]["protocol"] == "stream" and ours["settings"]["bos"] == "auto"


def test_embedded_text_is_a_stream_too(stories_path):
    text = "".join(read_documents("tinystories:eval").pieces())
    ours = evaluate(stories_path, EvalConfig(max_tokens=2048), device="cpu")
    expected, scored = plain_transformers_perplexity(stories_path, text, 2048, 256, 256)
    assert ours["tokens_scored"] == scored and abs(ours["perplexity"] - expected) / expected < 1e-4
