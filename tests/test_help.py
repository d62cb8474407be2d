"""Every command's --help ends in examples that parse with today's options, and `quantcli --help`
lists every exit code the errors module and the signal handling can return."""

from __future__ import annotations

import shlex

import pytest
import typer
from typer.testing import CliRunner

from quantcli import errors
from quantcli.cli.app import app
from quantcli.cli.helptext import EXAMPLES

COMMAND = typer.main.get_command(app)


def test_root_help_lists_every_exit_code():
    text = CliRunner().invoke(app, ["--help"]).stdout
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.QuantCliError)}
    for code in {0, *codes, 130, 143, 129}:
        assert f" {code} " in text, code
    assert "Exit codes:" in text


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_each_command_has_examples_that_parse(name):
    text = CliRunner().invoke(app, [name, "--help"]).stdout
    assert "Example" in text and f"quantcli {name}" in text
    lines = [line.split("#")[0].strip() for line in EXAMPLES[name].splitlines() if line.strip().startswith("quantcli ")]
    assert lines
    for line in lines:
        words = shlex.split(line)[1:]
        assert words[0] == name
        command = COMMAND.commands[name]
        command.make_context(name, words[1:])  # raises click.UsageError on an unknown option or bad value
