"""``inspect`` never prints a quantcli.json whose claims contradict the weights (issue 25, class 9): it checks
them against the model's meta-device skeleton and config.json, as ``eval`` does against the loaded model."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.support.badfiles import quantized_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def claim(data, **changes):
    data.update(changes)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: claim(d, bits=8), "claims 8-bit but its layers are ['4']-bit."),
        (
            lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(shape=[64, 64]),
            "says layer model.layers.0.mlp.up_proj is (64, 64) but the weights are (172, 64).",
        ),
        (
            lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(bits=8),
            "says layer model.layers.0.mlp.up_proj is 8-bit but the weights are stored 4-bit.",
        ),
        (
            lambda d: d["layers"].pop("model.layers.0.mlp.up_proj"),
            "omits quantized layer(s) model.layers.0.mlp.up_proj",
        ),
    ],
    ids=["bits", "shape", "layer-bits", "omitted"],
)
def test_inspect_refuses_claims_the_checkpoint_contradicts(checkpoint, tmp_path, edit, message):
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    data = json.loads((folder / "quantcli.json").read_text())
    edit(data)
    (folder / "quantcli.json").write_text(json.dumps(data))
    for command in (["inspect", str(folder)], ["inspect", str(folder), "--json"]):
        result = CliRunner().invoke(app, command)
        assert (result.exit_code, result.stdout) == (3, ""), result.stderr
        assert result.stderr.startswith(f"error: {folder / 'quantcli.json'} ") and message in result.stderr


def test_inspect_still_prints_a_true_checkpoint(checkpoint):
    result = CliRunner().invoke(app, ["inspect", str(checkpoint), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["bits"] == 4
