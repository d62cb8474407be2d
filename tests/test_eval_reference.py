"""evaluate_sequences against the transformers docs' "perplexity of fixed-length models" loop."""

from __future__ import annotations

import math

import pytest
import torch

from quantcli.checkpoint import load
from quantcli.data import read_documents, token_sequences
from quantcli.perplexity import evaluate_sequences


@pytest.fixture(scope="module")
def stories(stories_path):
    model, tokenizer, _ = load(stories_path, "cpu")
    stream = token_sequences(read_documents("tinystories:eval").documents, tokenizer, "start", 1500)
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
