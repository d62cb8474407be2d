"""--resume verifies its staging folder before splicing anything in (issue 25, class 6): the source files,
options and versions must be those of the interrupted run, each finished shard the file it wrote, and the
state file whole. A mismatch is refused in one line naming it, and the finished work is kept."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from quantcli.config.recipes import config_from_mapping
from quantcli.errors import ResumeStateError
from quantcli.run.pipeline import quantize
from quantcli.run.resume_state import fingerprint, seal
from tests.support.badfiles import copy_model
from tests.support.hostile import STREAM, cli, interrupted_staging, resume_argv

FINISHED = ["model-00001-of-00007.safetensors", "model-00002-of-00007.safetensors"]
KEPT = "The finished work is kept there. Run the same command without resume=True to start over."


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A copy of stories260K and the staging folder of a real --low-memory run interrupted after 2 of 5 blocks."""
    folder = tmp_path_factory.mktemp("resume")
    model = copy_model(folder / "model")
    return model, interrupted_staging(folder / "out", str(model))


@pytest.fixture()
def setup(interrupted, tmp_path):
    """Private copies of the model and the staging folder, the state's source moved to the copy."""
    model, staging = interrupted
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(staging, tmp_path / staging.name)
    state = json.loads((tmp_path / staging.name / "resume.json").read_text())
    state["settings"]["source"] = str(tmp_path / "model")
    files = [path for path in (tmp_path / "model").iterdir() if path.suffix in (".safetensors", ".json")]
    state["settings"]["source_files"] = fingerprint(files)
    (tmp_path / staging.name / "resume.json").write_text(json.dumps(seal(state)))
    return tmp_path / "model", tmp_path / staging.name, tmp_path / "out"


def resume(model, target, **options):
    return quantize(config_from_mapping({**STREAM, "model": str(model), "output": target, "resume": True, **options}))


def refused(tmp_path, target, message):
    (kept,) = tmp_path.glob(".out.partial-*")
    assert sorted(p.name for p in kept.glob("*.safetensors")) == FINISHED and not target.exists()
    assert message.startswith(f"cannot resume from {kept}: ") and message.endswith(KEPT)
    return message[len(f"cannot resume from {kept}: ") : -len(KEPT) - 2]


def test_the_untouched_staging_folder_resumes(setup, tmp_path):
    model, _, target = setup
    assert resume(model, target).stats["resumed_shards"] == 2


def test_a_changed_model_is_refused_in_a_real_process(setup, tmp_path):
    model, _, target = setup

    def edit(state):
        state["model.layers.4.mlp.up_proj.weight"] *= 2  # a block not finished yet: stale shards would be spliced in

    state = load_file(model / "model.safetensors")
    edit(state)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    code, out, err = cli(resume_argv(str(model), target), tmp_path)
    assert (code, out, len(err)) == (2, "", 1), err
    (kept,) = tmp_path.glob(".out.partial-*")
    assert re.fullmatch(
        rf"error: cannot resume from {re.escape(str(kept))}: it was written with other source_files \(source_files:"
        r" \{'config.json': \[\d+, \d+\], 'generation_config.json': \[\d+, \d+\],"
        r" 'model.safetensors': \[\d+, \d+\], .*\}"
        r" then, .* now\)\."
        r" The finished work is kept there\. Run the same command without --resume to start over\.",
        err[0],
    ), err[0]
    assert sorted(p.name for p in kept.glob("*.safetensors")) == FINISHED


def test_other_options_are_refused_by_name(setup, tmp_path):
    model, _, target = setup
    with pytest.raises(ResumeStateError) as raised:
        resume(model, target, group_size=64)
    assert refused(tmp_path, target, str(raised.value)).startswith("it was written with other options (options: {")


def test_other_versions_are_refused(setup, tmp_path):
    model, staging, target = setup
    state = json.loads((staging / "resume.json").read_text())
    state["settings"]["versions"]["torch"] = "1.0"
    (staging / "resume.json").write_text(json.dumps(seal(state)))
    with pytest.raises(ResumeStateError) as raised:
        resume(model, target)
    assert refused(tmp_path, target, str(raised.value)).startswith("it was written with other versions (versions: {")


@pytest.mark.parametrize(
    "edit, why",
    [
        (
            lambda shard: shard.write_bytes(shard.read_bytes()[:-8]),
            "is not the file this run wrote (its SHA-256 differs from",
        ),
        (lambda shard: shard.unlink(), "the finished file model-00002-of-00007.safetensors is missing"),
        (
            lambda shard: save_file({k: v[:1] for k, v in load_file(shard).items()}, shard),
            "is not the file this run wrote",
        ),
    ],
    ids=["truncated", "missing", "wrong-shapes"],
)
def test_a_changed_finished_shard_is_refused(setup, tmp_path, edit, why):
    model, staging, target = setup
    shard = staging / FINISHED[1]
    edit(shard)
    with pytest.raises(ResumeStateError) as raised:
        resume(model, target)
    (kept,) = tmp_path.glob(".out.partial-*")
    assert why in str(raised.value) and str(raised.value).endswith(KEPT) and not target.exists()
    assert (kept / FINISHED[0]).exists()


@pytest.mark.parametrize(
    "make, why",
    [
        (
            lambda path: path.write_bytes(path.read_bytes()[:300]),
            "resume.json is not valid JSON (JSONDecodeError; a run killed while",
        ),
        (lambda path: (path.unlink(), path.symlink_to("/dev/zero")), "resume.json cannot be read: resume state"),
        (
            lambda path: path.write_text(json.dumps(seal({"settings": {}, "done": "all"}))),
            "resume.json has no valid 'done'",
        ),
        (
            lambda path: path.write_text(
                path.read_text().replace('"done": [', '"done": [\n"model-00003-of-00007.safetensors",')
            ),
            "resume.json does not match its own SHA-256 (damaged or edited)",
        ),
    ],
    ids=["truncated", "dev-zero", "malformed", "edited"],
)
def test_a_broken_state_file_is_refused_and_the_shards_kept(setup, tmp_path, make, why):
    model, staging, target = setup
    make(staging / "resume.json")
    with pytest.raises(ResumeStateError) as raised:
        resume(model, target)
    assert refused(tmp_path, target, str(raised.value)).startswith(why)


def test_the_resume_state_checks_every_field_of_a_layout():
    """A field added to IntLayout must be checked in resume.json too, or every resume of such a run is refused."""
    import dataclasses

    from quantcli.quant.intgrid import IntLayout
    from quantcli.run.resume_state import LAYOUT_TYPES

    assert set(LAYOUT_TYPES) == {field.name for field in dataclasses.fields(IntLayout)}
