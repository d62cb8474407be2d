"""--force never destroys the input model or data quantcli did not write: an output that contains the
input or lies inside it is refused (also through symlinks, '.', '..' and relative paths), and an
existing folder is replaced only if quantcli wrote it (it holds quantcli.json) or it is empty."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests.conftest import tmpfs
from tests.support.badfiles import copy_model

QUANTIZE = ["quantize", "--bits", "4", "--method", "rtn", "--no-eval", "-q", "--force"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tmp/data/{model, notes.txt}, cwd = tmp/data."""
    data = tmp_path / "data"
    data.mkdir()
    copy_model(data / "model")
    (data / "notes.txt").write_text("my notes")
    monkeypatch.chdir(data)
    return tmp_path


def _refused(world: Path, argv: list[str], text: str) -> None:
    before = _tree(world)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr
    assert _tree(world) == before, "a refused run changed files"


@pytest.mark.parametrize(
    "model, output",
    [
        ("model", "."),  # the current directory holds the model
        ("model", ".."),
        (".", "."),  # the same folder
        ("model", "../data/model"),
        ("model", "model/../../data"),
        ("model", str(Path("..") / "data")),
        ("./model/", "{tmp}"),  # an absolute ancestor
        ("{tmp}/data/model", "model/."),  # the same folder spelled differently
    ],
)
def test_output_containing_the_input_is_refused(world, model, output):
    model, output = model.format(tmp=world), output.format(tmp=world)
    same = os.path.realpath(model) == os.path.realpath(output)
    _refused(
        world, [*QUANTIZE, model, "-o", output], "is the input model's folder" if same else "contains the input model"
    )


def test_output_inside_the_input_is_refused(world):
    _refused(world, [*QUANTIZE, "model", "-o", "model/quantized"], "inside the input model")


def test_symlinks_to_the_input_or_its_parent_are_refused(world):
    (world / "link-to-data").symlink_to(world / "data")
    (world / "link-to-model").symlink_to(world / "data" / "model")
    _refused(world, [*QUANTIZE, "model", "-o", str(world / "link-to-data")], "contains the input model")
    _refused(world, [*QUANTIZE, str(world / "link-to-model"), "-o", "."], "contains the input model")
    _refused(world, [*QUANTIZE, "model", "-o", str(world / "link-to-model")], "input model")


def test_force_refuses_a_folder_quantcli_did_not_write(world):
    other = world / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    _refused(world, [*QUANTIZE, "model", "-o", str(other)], "was not written by quantcli")
    _refused(world, [*QUANTIZE, "model", "-o", str(world)], "contains the input model")


def test_the_current_folder_or_its_parent_is_refused(world, monkeypatch):
    first = CliRunner().invoke(app, [*QUANTIZE, "model", "-o", str(world / "q")])
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(world / "q")
    _refused(world, [*QUANTIZE, str(world / "data" / "model"), "-o", "."], "is the current folder or holds it")


def test_force_refuses_a_symlink_as_output(world):
    first = CliRunner().invoke(app, [*QUANTIZE, "model", "-o", str(world / "q")])
    assert first.exit_code == 0, first.output
    (world / "q-link").symlink_to(world / "q")
    _refused(world, [*QUANTIZE, "model", "-o", str(world / "q-link")], "is a symbolic link")


def test_force_replaces_an_empty_folder_and_a_quantcli_output(world):
    empty = world / "empty"
    empty.mkdir()
    for _ in range(2):  # empty, then quantcli's own output
        result = CliRunner().invoke(app, [*QUANTIZE, "model", "-o", str(empty)])
        assert result.exit_code == 0, result.output
        assert (empty / "quantcli.json").exists()
    assert (world / "data" / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(world)) == ["data", "empty"]


@pytest.mark.parametrize(
    "output, text",
    [
        ("/proc/quantcli-out", "creating a file in /proc failed"),
        ("/sys/quantcli-out", "creating a file in /sys failed"),
        ("/dev/null/out", "/dev/null is a file, not a folder"),
        ("notes.txt/out", "notes.txt is a file, not a folder"),
    ],
)
def test_an_unwritable_output_is_refused_before_loading(world, output, text):
    _refused(world, [*QUANTIZE, "does-not-load-if-checked-first", "-o", output], text)


def test_a_read_only_file_system_is_refused_before_loading(world):
    with tmpfs(world / "ro", "ro,size=64k") as disk:
        _refused(
            world,
            [*QUANTIZE, "model", "-o", str(disk / "out")],
            f"creating a file in {disk} failed (read-only file system)",
        )
