"""Broken checkpoints, models and datasets raise typed errors that say what is wrong and how to fix it."""

from __future__ import annotations

import json

import pytest
import torch

from quantcli import load
from quantcli.checkpoint.metadata import read_metadata
from quantcli.config.quantize import CalibrationConfig, EvalConfig
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import CheckpointError, DatasetError, ModelLoadError
from quantcli.measure.evaluation import evaluate
from quantcli.run.pipeline import quantize
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import load_tokenizer
from tests.conftest import logits
from tests.support.badfiles import big_tokenizer_model, edit_json, nan_model, quantized_checkpoint, truncate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp("ckpt") / "rtn4")


@pytest.fixture
def copy(checkpoint, tmp_path):
    import shutil

    return shutil.copytree(checkpoint, tmp_path / "copy")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors_is_a_checkpoint_error(copy, keep):
    truncate(copy / "model.safetensors", keep)
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load(copy, "cpu")


def test_newer_format_version_asks_for_an_upgrade(copy):
    edit_json(copy / "quantcli.json", format_version=99)
    with pytest.raises(
        CheckpointError, match=r"format version 99, newer than this quantcli reads \(1\).*pip install -U"
    ):
        load(copy, "cpu")


@pytest.mark.parametrize(
    "text", ["{", '"just a string"', '{"format_version": "1"}', '{"format_version": true}', "[" * 100_000]
)
def test_bad_metadata_is_a_checkpoint_error(copy, text):
    (copy / "quantcli.json").write_text(text)
    with pytest.raises(CheckpointError):
        read_metadata(copy)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = big_tokenizer_model(tmp_path / "model")
    assert len(load_tokenizer(str(folder))) == 520
    with pytest.raises(ModelLoadError, match="520 tokens but the model's embedding has 512 rows"):
        load(folder, "cpu")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        quantize(config_from_mapping({"bits": 8, "model": str(folder), "output": tmp_path / "out", "eval": None}))
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_naming_the_layer(tmp_path):
    folder = nan_model(tmp_path / "model", "model.layers.1.self_attn.q_proj")
    with pytest.raises(ModelLoadError, match=r"weight model.layers.1.self_attn.q_proj.weight holds 1 NaN/inf"):
        quantize(config_from_mapping({"bits": 4, "model": str(folder), "output": tmp_path / "out", "eval": None}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_calibration_text_shorter_than_one_window(tmp_path, stories_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    tokenizer = load_tokenizer(stories_path)
    with pytest.raises(DatasetError, match=r"has \d+ tokens, fewer than one window of calibration.seq_len=256"):
        calibration_batch(read_documents(str(short)), tokenizer, 4, CalibrationConfig().seq_len, 0)


def test_eval_text_shorter_than_one_window(tmp_path, checkpoint):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    with pytest.raises(
        DatasetError, match=r"evaluation dataset .* has \d+ tokens, fewer than one window of eval.seq_len=64"
    ):
        evaluate(str(checkpoint), EvalConfig(str(short), seq_len=64), device="cpu")


def test_sharded_checkpoint_reloads_in_plain_transformers_with_identical_logits(tmp_path, checkpoint, prompt_ids):
    from transformers import AutoModelForCausalLM

    sharded = quantized_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    plain_sharded = AutoModelForCausalLM.from_pretrained(sharded)
    plain_single = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(logits(plain_sharded, prompt_ids), logits(plain_single, prompt_ids))
    assert torch.equal(logits(load(sharded, "cpu")[0], prompt_ids), logits(load(checkpoint, "cpu")[0], prompt_ids))


@pytest.mark.parametrize(
    "quantization, decompressed",
    [
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"format": "pack-quantized", "weights": {"num_bits": 4}}},
            },
            True,
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 8}}},
            },
            True,
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"format": "int-quantized", "input_activations": {"num_bits": 8}}},
            },
            False,
        ),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"format": "float-quantized"}}}, False),
        (
            {
                "quant_method": "compressed-tensors",
                "sparsity_config": {"format": "sparse-24"},
                "config_groups": {"g": {"format": "pack-quantized"}},
            },
            False,
        ),
        ({"quant_method": "bitsandbytes"}, False),
        ("not a mapping", False),
    ],
)
def test_foreign_compressed_tensors_read_by_quantcli_are_weight_only_integers(tmp_path, quantization, decompressed):
    """Activation-quantized, float or sparse checkpoints go to transformers, which knows how to run them."""
    from quantcli.checkpoint.load import _integer_weights_only

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quantization}))
    assert _integer_weights_only(str(tmp_path)) is decompressed
