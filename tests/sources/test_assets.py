"""The embedded stories260K checkpoint is the real trained model, correctly converted."""

import math

import torch

from quantcli.measure.perplexity import evaluate_sequences
from quantcli.sources.datasets import TextSource, read_documents, token_sequences
from quantcli.sources.models import load_model, load_tokenizer

PUBLISHED_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    " One day, she saw a big, red ball."
)


def test_greedy_decoding_reproduces_llama2c_sample(stories_path):
    tokenizer = load_tokenizer(stories_path)
    model = load_model(stories_path, torch.float32, "cpu")
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith(PUBLISHED_SAMPLE)


def test_perplexity_matches_provenance_measurement(stories_path):
    """The provenance protocol: the first 40 paragraphs of the text, each its own document with BOS,
    cut to 256 tokens: 1.3565 nats/token (ppl 3.88)."""
    tokenizer = load_tokenizer(stories_path)
    model = load_model(stories_path, torch.float32, "cpu")
    paragraphs = "".join(read_documents("tinystories:calib").pieces()).split("\n\n")
    first_40 = TextSource("first 40 paragraphs", documents=paragraphs[:40])
    sequences = [s[:256] for s in token_sequences(first_40, tokenizer, "documents", "start")]
    result = evaluate_sequences(model, sequences, seq_len=256, stride=256)
    assert result.tokens_scored == 4059
    assert math.isclose(result.nll, 1.3565, abs_tol=5e-4)
    assert 3.87 < result.perplexity < 3.90
    assert result.ci95[0] < result.perplexity < result.ci95[1]
