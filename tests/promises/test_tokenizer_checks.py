"""A checkpoint with an unusable tokenizer is refused before any work (issue 25, class 4): a partial copy
without tokenizer.json (transformers builds a 3-token tokenizer), a tokenizer that encodes text to unknown
tokens, and a GGUF file is read with its own tokenizer, never the tokenizer files lying beside it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantcli.checkpoint.load import load
from quantcli.cli.app import app
from tests.support.badfiles import copy_model
from tests.support.gguf_files import write_llama_gguf
from tests.support.hostile import cli

FIX = "Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) next to its weights."


def partial_copy(folder):
    model = copy_model(folder)
    (model / "tokenizer.json").unlink()
    return model


def unknown_words(folder):
    """stories260K with a 512-word tokenizer that knows none of the sample's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = copy_model(folder)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"})
    )
    return model


@pytest.mark.parametrize("argv", [["--no-eval"], ["--low-memory"]], ids=["no-eval", "low-memory"])
def test_a_partial_copy_without_its_tokenizer_is_refused_in_a_real_process(tmp_path, argv):
    model = partial_copy(tmp_path / "model")
    code, out, err = cli(["quantize", model, "--bits", "4", "-o", "out", *argv], tmp_path)
    assert (code, out, err) == (
        3,
        "",
        [
            f"error: the tokenizer of {model} has 3 tokens but the model's embedding has 512 rows: it is not the"
            " model's"
            f" tokenizer (a partial copy?). {FIX}"
        ],
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["quantize", "--bits", "4", "-o", "out"], ["eval", "--max-tokens", "256"]])
def test_a_tokenizer_that_encodes_text_to_unknown_tokens_is_refused(tmp_path, monkeypatch, command):
    model = unknown_words(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [command[0], str(model), *command[1:]])
    assert (result.exit_code, result.stdout) == (3, ""), result.stderr
    assert result.stderr == (
        f"error: the tokenizer of {model} encodes a 100-character English sample to 0 known token(s): it cannot encode"
        f" text. {FIX}\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_is_read_with_its_own_tokenizer(stories_path, tmp_path):
    pytest.importorskip("gguf")
    path = write_llama_gguf(stories_path, tmp_path / "stories.gguf")
    _, alone, _ = load(path, "cpu")
    unknown_words(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # another model's tokenizer lying beside the file
        (tmp_path / name).write_bytes((tmp_path / "other" / name).read_bytes())
    _, beside, _ = load(path, "cpu")
    text = "Once upon a time there was a cat."
    assert len(beside) == len(alone) == 512
    assert beside(text)["input_ids"] == alone(text)["input_ids"] and len(alone(text)["input_ids"]) > 5
