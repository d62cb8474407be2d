"""--force never deletes the run's other inputs (issue 25, class 5): a recipe or dataset inside the output
folder it would replace is refused in one line (exit 2), before any work, and stays where it was."""

from __future__ import annotations

import pytest

from quantcli.config.recipes import config_from_mapping
from quantcli.errors import InputError
from quantcli.run.pipeline import quantize
from tests.support.badfiles import quantized_checkpoint
from tests.support.hostile import cli

TEXT = "Once upon a time there was a little cat. " * 400


@pytest.fixture()
def old_output(tmp_path):
    """A finished quantcli output folder: --force may replace it."""
    return quantized_checkpoint(tmp_path / "out")


def test_a_recipe_inside_the_output_is_refused_in_a_real_process(tmp_path, old_output):
    (old_output / "recipe.yaml").write_text("bits: 4\nmethod: rtn\n")
    code, out, err = cli(["quantize", "-c", "out/recipe.yaml", "-o", "out", "--force", "--no-eval"], tmp_path)
    assert (code, out, err) == (
        2,
        "",
        [
            "error: output out holds the recipe out/recipe.yaml; replacing it (--force) would delete it."
            " Move the recipe out of it, or choose another --output."
        ],
    )
    assert (old_output / "recipe.yaml").read_text() == "bits: 4\nmethod: rtn\n"


@pytest.mark.parametrize(
    "key, what",
    [
        ({"calibration": {"dataset": "{data}", "samples": 4, "seq_len": 32}, "method": "gptq"}, "calibration dataset"),
        ({"eval": {"dataset": "{data}", "max_tokens": 256}}, "eval dataset"),
        ({"allocation": {"target_bpw": 6, "search_dataset": "{data}"}}, "search dataset"),
    ],
)
def test_a_dataset_inside_the_output_is_refused(tmp_path, old_output, key, what):
    data = old_output / "sub" / "text.txt"
    data.parent.mkdir()
    data.write_text(TEXT)
    recipe = {"bits": 4, "output": old_output, "force": True, "eval": None}
    for name, section in key.items():
        recipe[name] = (
            {k: str(data) if v == "{data}" else v for k, v in section.items()} if isinstance(section, dict) else section
        )
    if "allocation" in recipe:
        recipe.pop("bits")
    with pytest.raises(InputError, match=f"^output {old_output} holds the {what} {data}; replacing it"):
        quantize(config_from_mapping(recipe))
    assert data.read_text() == TEXT
