"""Method ``awq`` (AWQ scaling + round-to-nearest) and GPTQ's ``awq``/``refit_scales`` options on the real
stories260K model: better than rtn on the same grid, checkpoints plain transformers loads with identical
logits, streamed bit-identical to in memory, options refused where a run cannot honour them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantcli
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import InputError
from quantcli.run.pipeline import quantize
from tests.conftest import logits
from tests.run.test_streaming import tensors

RECIPE = {
    "bits": 4,
    "group_size": 32,
    "eval": {"max_tokens": 2048},
    "calibration": {"samples": 16, "seq_len": 64, "seed": 3},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_path):
    root = tmp_path_factory.mktemp("awq")
    return {
        method: quantize(
            config_from_mapping({**RECIPE, "model": stories_path, "method": method, "output": root / method})
        )
        for method in ("rtn", "awq")
    }


def test_awq_beats_round_to_nearest_on_the_same_grid(runs):
    after = {method: report.to_dict()["perplexity_after"]["perplexity"] for method, report in runs.items()}
    assert after["awq"] < after["rtn"]
    layers = runs["awq"].to_dict()["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["note"].endswith("folded into model.layers.0.mlp.up_proj")
    assert runs["awq"].to_dict()["options"] == runs["rtn"].to_dict()["options"]  # the same grid, nothing else


def test_plain_transformers_loads_awq_with_identical_logits(runs, prompt_ids):
    folder = runs["awq"].to_dict()["output"]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(plain, prompt_ids), logits(quantcli.load(folder)[0], prompt_ids))


def test_streamed_awq_is_bit_identical_to_in_memory(runs, stories_path, tmp_path):
    recipe = {**RECIPE, "eval": None, "model": stories_path, "method": "awq"}
    quantize(config_from_mapping({**recipe, "output": tmp_path / "streamed", "low_memory": True}))
    memory, streamed = tensors(Path(runs["awq"].to_dict()["output"])), tensors(tmp_path / "streamed")
    assert sorted(memory) == sorted(streamed)
    assert all(memory[key].dtype == streamed[key].dtype and torch.equal(memory[key], streamed[key]) for key in memory)


@pytest.mark.parametrize("name, what", [("refit_scales", "scale refit"), ("awq", "AWQ pre-step")])
def test_gptq_integer_grid_options_are_refused_on_gguf_grids(stories_path, tmp_path, name, what):
    recipe = {"bits": 4, "model": stories_path, "method": "gptq", "format": "gguf", "gguf_type": "Q4_0", name: True}
    with pytest.raises(InputError) as error:
        quantize(config_from_mapping({**recipe, "eval": None, "output": tmp_path / "out"}))
    assert str(error.value) == (
        f"{name}=True is not used with format='gguf': gptq's {what} is written for the integer grids"
        f" (compressed-tensors). Drop {name}=True."
    )
    assert list(tmp_path.iterdir()) == []
