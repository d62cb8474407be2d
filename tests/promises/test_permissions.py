"""Every file of a checkpoint gets the mode the user's umask gives new files: safetensors alone
writes weights 0600, which a server running as another user cannot read."""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("extra", [["-m", "rtn"], ["--low-memory"], ["-b", "16"]])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode, extra):
    previous = os.umask(umask)
    try:
        result = CliRunner().invoke(app, ["quantize", "-b", "4", *extra, "--no-eval", "-o", str(tmp_path / "out")])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert modes == dict.fromkeys(modes, mode)
