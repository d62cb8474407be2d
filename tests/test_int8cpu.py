"""The int8-cpu backend: exact integers from the checkpoint, close logits, small perplexity change."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantcli.checkpoint import load
from quantcli.config import EvalConfig, config_from_mapping
from quantcli.errors import UnavailableError
from quantcli.int8cpu import Int8Linear, recover_int8
from quantcli.models import bytes_in_memory
from quantcli.pipeline import measure_perplexity, quantize
from quantcli.progress import NullProgress


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8") / "rtn-w8"
    quantize(config_from_mapping({"bits": 8, "method": "rtn", "output": str(folder), "eval": None}))
    return folder


def test_recovers_stored_integers(int8_dir):
    dense, _, _ = load(int8_dir, "cpu")
    stored = load_file(int8_dir / "model.safetensors")
    for name in ("model.layers.0.mlp.down_proj", "model.layers.4.self_attn.q_proj"):
        q, scale = recover_int8(dict(dense.named_modules())[name].weight)
        assert torch.equal(q, stored[name + ".weight"])
        torch.testing.assert_close(scale, stored[name + ".weight_scale"][:, 0])


def test_logits_and_perplexity_close(int8_dir, prompt_ids):
    dense, tokenizer, _ = load(int8_dir, "cpu")
    fast, _, _ = load(int8_dir, "cpu", backend="int8-cpu")
    swapped = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert len(swapped) == 35 and not isinstance(fast.lm_head, Int8Linear)
    with torch.no_grad():
        a, b = dense(prompt_ids).logits, fast(prompt_ids).logits
    assert (a - b).abs().max() < 0.08 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert bytes_in_memory(fast) < 0.45 * bytes_in_memory(dense)
    config = EvalConfig(max_tokens=2048, seq_len=128)
    ppl_dense = measure_perplexity(dense, tokenizer, config, NullProgress(), "dense").perplexity
    ppl_fast = measure_perplexity(fast, tokenizer, config, NullProgress(), "int8").perplexity
    assert abs(ppl_fast / ppl_dense - 1) < 0.01


def test_refuses_non_int8(stories_path):
    with pytest.raises(UnavailableError, match="INT8 checkpoint"):
        load(stories_path, "cpu", backend="int8-cpu")


def test_one_token_and_batched_paths_agree():
    """Decode (one row) skips the per-token rescaling: fbgemm's own range is then the row's, so it is
    at least as accurate as the batched path; both stay within int8 error of the exact product."""
    import torch

    from quantcli.int8cpu import Int8Linear

    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    scale = weight.abs().amax(1) / 127.5
    layer = Int8Linear(torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8), scale, None)
    rows = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    together = layer(rows)
    one_by_one = torch.cat([layer(row[None]) for row in rows])
    exact = rows @ weight.T
    batched_error, decode_error = (together - exact).abs().max(), (one_by_one - exact).abs().max()
    assert batched_error < 0.05 and decode_error < 0.05
    assert decode_error <= batched_error * 1.1
