"""Inputs that are data never choose what code runs (issue 25, class 1): a recipe cannot turn on a model's
own Python code, and a --resume state file cannot name what is imported or called."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from quantcli.config.recipes import config_from_mapping
from quantcli.errors import ResumeStateError
from quantcli.run.pipeline import quantize
from quantcli.run.resume_state import seal
from quantcli.sources.models import EMBEDDED_MODEL
from tests.support.badfiles import remote_code_model
from tests.support.hostile import STREAM, cli, interrupted_staging, resume_argv


def test_a_recipe_cannot_turn_on_remote_code(tmp_path):
    marker = tmp_path / "ran"
    model = remote_code_model(tmp_path / "model", marker)
    (tmp_path / "recipe.yaml").write_text(f"bits: 4\nmethod: rtn\nmodel: {model}\ntrust_remote_code: true\n")
    code, out, err = cli(["quantize", "-c", "recipe.yaml", "-o", "out", "--no-eval"], tmp_path)
    assert (code, out, len(err)) == (2, "", 1)
    assert err[0] == (
        "error: recipe recipe.yaml sets trust_remote_code: a recipe is data and cannot choose to run a model's own"
        " Python code. Remove the key, and pass --trust-remote-code on the command line if you trust the model."
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_command_line_flag_still_runs_remote_code_named_by_a_recipe(tmp_path):
    marker = tmp_path / "ran"
    model = remote_code_model(tmp_path / "model", marker)
    (tmp_path / "recipe.yaml").write_text(f"bits: 4\nmethod: rtn\nmodel: {model}\n")
    argv = ["quantize", "-c", "recipe.yaml", "-o", "out", "--no-eval", "--trust-remote-code", "-q"]
    code, _, err = cli(argv, tmp_path)
    assert code == 0, err
    assert marker.exists()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The staging folder of a real interrupted --low-memory run of stories260K (2 of 5 blocks finished)."""
    return interrupted_staging(tmp_path_factory.mktemp("resume") / "out", str(EMBEDDED_MODEL))


def hostile_state(interrupted, tmp_path, edit):
    staging = tmp_path / interrupted.name
    shutil.copytree(interrupted, staging)
    state = json.loads((staging / "resume.json").read_text())
    edit(state["written"]["model.layers.0.self_attn.q_proj"])
    (staging / "resume.json").write_text(json.dumps(seal(state)))  # resealed, as someone who means it would
    return tmp_path / "out"


KEPT = "The finished work is kept there. Run the same command without --resume to start over."
FINISHED = ["model-00001-of-00007.safetensors", "model-00002-of-00007.safetensors"]


def test_a_resume_state_cannot_name_code_to_import(interrupted, tmp_path):
    target = hostile_state(interrupted, tmp_path, lambda record: record.update(type="os:system"))
    code, out, err = cli(resume_argv(str(EMBEDDED_MODEL), target), tmp_path)
    assert (code, out, len(err)) == (2, "", 1), err
    (kept,) = tmp_path.glob(".out.partial-*")  # renamed after the process that adopted it, which is gone
    assert err[0] == (
        f"error: cannot resume from {kept}: the record of model.layers.0.self_attn.q_proj in resume.json is not one of"
        f" quantcli's layer records (IntWeights, NF4Weights). {KEPT}"
    )
    assert sorted(p.name for p in kept.glob("*.safetensors")) == FINISHED and not target.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda record: record.update(type="quantcli.checkpoint.atomic:write_json"),
            "is not one of quantcli's layer records",
        ),
        (lambda record: record["tensors"]["q"].__setitem__(1, "load"), "'load'], not [shape, dtype]"),
        (lambda record: record["tensors"].update(path=[[1], "int8"]), "holds tensors"),
        (lambda record: record["layout"].update(scale_dtype="load"), "has a layout outside quantcli's grids"),
        (lambda record: record["tensors"]["q"].__setitem__(0, [64, 32]), "stores a [64, 32] grid for a"),
    ],
    ids=["quantcli-callable", "torch-attribute", "extra-argument", "layout-dtype", "wrong-shape"],
)
def test_a_resume_state_is_checked_field_by_field(interrupted, tmp_path, edit, message):
    target = hostile_state(interrupted, tmp_path, edit)
    with pytest.raises(ResumeStateError, match=re.escape(message)) as raised:
        quantize(config_from_mapping({**STREAM, "model": str(EMBEDDED_MODEL), "output": target, "resume": True}))
    assert str(raised.value).endswith(KEPT.replace("--resume", "resume=True"))
    (kept,) = tmp_path.glob(".out.partial-*")
    assert sorted(p.name for p in kept.glob("*.safetensors")) == FINISHED and not target.exists()
