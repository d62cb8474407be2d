"""Row data whose text is missing or not a string is refused with the count, never dropped without a word
(issue 25, class 9)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app

STORY = "Once upon a time there was a little cat who liked to play in the sun with her friends."


@pytest.mark.parametrize("row", [{}, {"text": None}, {"text": 7}], ids=["missing", "null", "number"])
def test_rows_without_text_are_refused_with_their_count(tmp_path, monkeypatch, row):
    rows = [{"text": STORY} if index % 2 else row for index in range(200)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(item) + "\n" for item in rows))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--dataset", "rows.jsonl", "--max-tokens", "256"])
    assert (result.exit_code, result.stdout) == (3, ""), result.stderr
    assert result.stderr == (
        "error: dataset rows.jsonl: 100 of 200 rows have no text in column 'text' (missing or not a string; the first"
        " is row 1)."
        " Fix or remove those rows, or name another column with --text-column.\n"
    )
