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
from tests.support.models import REPO

COMMAND = typer.main.get_command(app)


def test_root_help_lists_every_exit_code():
    text = CliRunner().invoke(app, ["--help"]).stdout
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.QuantCliError)
    }
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


def test_every_exit_code_has_one_meaning_shown_in_help_and_readme():

    text = CliRunner().invoke(app, ["--help"]).stdout
    readme = (REPO / "README.md").read_text()
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.QuantCliError)
    }
    assert {0, 129, 130, 143} | codes == set(errors.EXIT_CODES)
    for code, meaning in errors.EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme
        assert " ".join(meaning.split()) in " ".join(text.split())


def test_method_help_names_every_method_and_the_defaults_the_registry_picks():
    from quantcli.cli.quantize import METHOD_HELP
    from quantcli.methods import available_methods, describe_defaults

    listed, _, defaults = METHOD_HELP.partition(". Default: ")
    assert sorted(listed.split(", ")) == sorted(cls.name for cls in available_methods())
    assert defaults == describe_defaults() + "."
