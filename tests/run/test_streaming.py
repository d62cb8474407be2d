"""Streaming from disk block by block: the same checkpoint as in memory, and --resume gives the same result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantcli import load
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import ResumableInterrupt
from quantcli.run.pipeline import quantize
from quantcli.sources.models import EMBEDDED_MODEL
from tests.conftest import logits
from tests.support.hostile import StopAfter


def synthetic_llama(folder, layers=4, hidden=64, intermediate=128, shard="60KB"):
    """A random Llama with an untied head, saved in several safetensors shards, with the stories260K tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)
    return folder


def tensors(folder):
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return synthetic_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.mark.parametrize(
    "options",
    [{"bits": 4}, {"bits": 4, "symmetric": False, "group_size": 32}, {"bits": 4, "observer": "mse"}, {"bits": 8}],
)
def test_streaming_matches_in_memory_rtn(llama, tmp_path, prompt_ids, options):
    recipe = {"model": str(llama), "method": "rtn", "eval": None, **options}
    in_memory = quantize(config_from_mapping({**recipe, "output": tmp_path / "memory"}))
    report = quantize(config_from_mapping({**recipe, "output": tmp_path / "streamed", "low_memory": True}))
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    assert report.stats["shards"] == 7
    assert all(
        report.size[key] == in_memory.size[key]
        for key in ("parameters", "original_memory_bytes", "original_disk_bytes")
    )
    assert report.layers == in_memory.layers  # 4 decoder layers, then embeddings, norm and head one by one
    a, b = tensors(memory), tensors(streamed)
    assert sorted(a) == sorted(b)
    assert all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a)
    config_a, config_b = (json.loads((folder / "config.json").read_text()) for folder in (memory, streamed))
    assert config_a["quantization_config"] == config_b["quantization_config"]
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert torch.equal(logits(load(streamed, "cpu")[0], prompt_ids), logits(load(memory, "cpu")[0], prompt_ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "streamed"]


LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def test_resume_continues_after_the_last_finished_layer_with_the_same_result(llama, tmp_path, prompt_ids):
    recipe = {"model": str(llama), "bits": 4, "eval": None, "low_memory": True}
    quantize(config_from_mapping({**recipe, "output": tmp_path / "whole"}))

    target = tmp_path / "resumed"
    with pytest.raises(ResumableInterrupt, match="interrupted after 2 of 7 layer groups.*resume=True"):
        quantize(config_from_mapping({**recipe, "output": target}), StopAfter(2 * LAYERS_PER_BLOCK + 1))
    assert not target.exists()
    (staging,) = tmp_path.glob(".resumed.partial-*")
    assert sorted(p.name for p in staging.glob("*.safetensors")) == [
        "model-00001-of-00007.safetensors",
        "model-00002-of-00007.safetensors",
    ]
    finished_before = {p.name: p.stat().st_mtime_ns for p in staging.glob("*.safetensors")}

    report = quantize(config_from_mapping({**recipe, "output": target, "resume": True}))
    assert report.stats["resumed_shards"] == 2
    assert all((target / name).stat().st_mtime_ns == mtime for name, mtime in finished_before.items())  # not redone
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    resumed = {p.name: p.read_bytes() for p in target.iterdir()}
    assert resumed.keys() == whole.keys() and "resume.json" not in resumed
    assert all(resumed[name] == whole[name] for name in whole if name.endswith(".safetensors") or name == "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]


def test_a_run_without_resume_starts_over_and_cleans_the_leftover(llama, tmp_path):
    recipe = {"model": str(llama), "bits": 4, "eval": None, "low_memory": True, "output": tmp_path / "out"}
    with pytest.raises(ResumableInterrupt):
        quantize(config_from_mapping(recipe), StopAfter(1))
    report = quantize(config_from_mapping(recipe))
    assert report.stats["resumed_shards"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


GPTQ = {
    "method": "gptq",
    "bits": 4,
    "group_size": 32,
    "eval": None,
    "calibration": {"samples": 16, "seq_len": 64, "seed": 3},
}


def test_streaming_gptq_is_bit_identical_to_in_memory(stories_path, tmp_path, prompt_ids):
    memory = quantize(config_from_mapping({**GPTQ, "model": stories_path, "output": tmp_path / "memory"}))
    streamed = quantize(
        config_from_mapping({**GPTQ, "model": stories_path, "output": tmp_path / "streamed", "low_memory": True})
    )
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    assert all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a)
    assert memory.layers == streamed.layers and memory.calibration == streamed.calibration
    assert (
        streamed.stats["shards"] == 7 and streamed.stats["decoder_blocks"] == "model.layers (5)"
    )  # 5 blocks, embeddings, norm
    assert torch.equal(
        logits(load(tmp_path / "streamed", "cpu")[0], prompt_ids),
        logits(load(tmp_path / "memory", "cpu")[0], prompt_ids),
    )


def test_streaming_gptq_resumes_from_the_saved_activations(stories_path, tmp_path):
    recipe = {**GPTQ, "model": stories_path, "low_memory": True}
    quantize(config_from_mapping({**recipe, "output": tmp_path / "whole"}))
    target = tmp_path / "resumed"
    with pytest.raises(ResumableInterrupt, match="interrupted after 3 of 7 layer groups"):
        quantize(config_from_mapping({**recipe, "output": target}), StopAfter(3 * LAYERS_PER_BLOCK + 1))
    (staging,) = tmp_path.glob(".resumed.partial-*")
    assert (staging / "activations.safetensors").exists()
    report = quantize(config_from_mapping({**recipe, "output": target, "resume": True}))
    assert (
        report.stats["resumed_shards"] == 3 and len(report.layers) == 5 * LAYERS_PER_BLOCK
    )  # the embedding and its tied head kept by default
    whole, resumed = tensors(tmp_path / "whole"), tensors(target)
    assert sorted(whole) == sorted(resumed) and all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]


def test_streaming_gptq_nf4_is_bit_identical_to_in_memory(stories_path, tmp_path, prompt_ids):
    recipe = {**GPTQ, "method": "gptq-nf4", "model": stories_path}
    recipe.pop("group_size")
    memory = quantize(config_from_mapping({**recipe, "output": tmp_path / "memory"}))
    streamed = quantize(config_from_mapping({**recipe, "output": tmp_path / "streamed", "low_memory": True}))
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    assert all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a)
    assert memory.layers == streamed.layers and streamed.format == "bitsandbytes"
    quantization = [
        json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        for name in ("memory", "streamed")
    ]
    assert quantization[0] == quantization[1]
    assert torch.equal(
        logits(load(tmp_path / "streamed", "cpu")[0], prompt_ids),
        logits(load(tmp_path / "memory", "cpu")[0], prompt_ids),
    )
