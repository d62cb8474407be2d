"""A checkpoint that lacks a weight, holds an extra one, has a mis-shaped one, or whose config declares
more layers than it holds never loads with random tensors: every load path refuses it (exit 3), in
memory, streamed (--low-memory), and quantcli.load of quantized checkpoints. Tied weights are fine.
A quantcli.json whose method, bits or layers disagree with the weights is refused too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from quantcli import load
from quantcli.cli.app import app
from quantcli.errors import CheckpointError
from tests.support.badfiles import copy_model, edit_weights, one_more_layer, quantized_checkpoint

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
BROKEN = {
    "missing": (
        lambda f: edit_weights(f, lambda s: s.pop(Q_PROJ)),
        f"it lacks 1 weight(s) the config needs ({Q_PROJ}), which would be random",
    ),
    "more-layers": (
        one_more_layer,
        "it declares 6 layers (num_hidden_layers) but the weights hold 5"
        " (model.layers.0 to model.layers.4); model.layers.5 onwards would be random",
    ),
    "unexpected": (
        lambda f: edit_weights(f, lambda s: s.update({"model.layers.1.extra.weight": torch.zeros(2)})),
        "it holds 1 weight(s) the config has no place for (model.layers.1.extra.weight)",
    ),
    "shape": (
        lambda f: edit_weights(f, lambda s: s.update({Q_PROJ: s[Q_PROJ][:, :-1].contiguous()})),
        f"{Q_PROJ} is (64, 63) in the file vs (64, 64) in the config",
    ),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    for name, (make, _) in BROKEN.items():
        make(copy_model(root / name))
    return root


@pytest.mark.parametrize("mode", ["memory", "sequential", "eval"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_checkpoint_not_matching_its_config_is_refused(broken, tmp_path, monkeypatch, kind, mode):
    monkeypatch.chdir(tmp_path)
    argv = {
        "memory": ["quantize", str(broken / kind), "-b", "4", "-m", "rtn", "--no-eval", "-o", "out"],
        "sequential": ["quantize", str(broken / kind), "-b", "4", "--low-memory", "-o", "out"],
        "eval": ["eval", str(broken / kind), "--max-tokens", "256"],
    }[mode]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 3, result.output
    assert (
        result.stderr.startswith(f"error: {broken / kind} does not match its config.json: ")
        and result.stderr.count("\n") == 1
    )
    assert BROKEN[kind][1] in result.stderr
    assert "report" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp("q") / "ckpt")


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


def test_a_quantized_checkpoint_missing_a_weight_is_refused(checkpoint, tmp_path):
    folder = edit_weights(_copy(checkpoint, tmp_path), lambda s: s.pop("model.layers.2.mlp.up_proj.weight_packed"))
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load(folder, "cpu")


def test_a_quantized_checkpoint_whose_config_declares_more_layers_is_refused(checkpoint, tmp_path):
    folder = one_more_layer(_copy(checkpoint, tmp_path))
    with pytest.raises(CheckpointError, match="model.layers.5"):
        load(folder, "cpu")


def _metadata_edit(folder, edit):
    path = folder / "quantcli.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return folder


CLAIMS = {
    "method": (lambda d: d.update(method="squeezellm"), "names method 'squeezellm', which quantcli does not know"),
    "bits": (lambda d: d.update(bits=8), "claims 8-bit but its layers are ['4']-bit"),
    "layer-bits": (
        lambda d: d["layers"]["model.layers.0.self_attn.q_proj"].update(bits=8),
        "says layer model.layers.0.self_attn.q_proj is 8-bit but the weights are stored 4-bit",
    ),
    "layer-missing": (
        lambda d: d["layers"].pop("model.layers.4.mlp.up_proj"),
        "omits quantized layer(s) model.layers.4.mlp.up_proj",
    ),
    "layer-extra": (
        lambda d: d["layers"].update({"model.layers.7.mlp.up_proj": {"bits": 4}}),
        "lists layer model.layers.7.mlp.up_proj, which the model does not have",
    ),
    "shape": (
        lambda d: d["layers"]["model.layers.0.self_attn.q_proj"].update(shape=[64, 32]),
        "is (64, 32) but the weights are (64, 64)",
    ),
    "layers-type": (lambda d: d.update(layers=[1, 2]), "is malformed: 'layers' must map layer names"),
}


@pytest.mark.parametrize("kind", list(CLAIMS))
def test_quantcli_json_claims_must_match_the_weights(checkpoint, tmp_path, kind):
    edit, text = CLAIMS[kind]
    folder = _metadata_edit(_copy(checkpoint, tmp_path), edit)
    with pytest.raises(CheckpointError) as raised:
        load(folder, "cpu")
    assert text in str(raised.value)


def test_the_untouched_checkpoint_and_tied_weights_load(checkpoint):
    model, _, metadata = load(checkpoint, "cpu")
    assert metadata["bits"] == 4 and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
