"""The group rule: a width the requested group size does not divide gets the nearest size that
does (kernel sizes first), stated once in the report and on stdout; per channel only when asked."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.quant.intgrid import group_size_for


@pytest.mark.parametrize(
    "width, requested, expected",
    [
        (576, 128, 64),  # SmolLM2 hidden size: halve to a size vLLM's Marlin and torch's int4 kernel take
        (1536, 128, 128),
        (576, 96, 96),
        (64, 128, 64),  # a group wider than the layer: the layer is one group
        (172, 64, 43),  # no power-of-two size >= 32 divides 172: its divisor nearest 64
        (172, 32, 43),
        (64, 7, 8),  # divisors below 8 are not groups worth a scale each
    ],
)
def test_group_size_for(width, requested, expected):
    assert group_size_for(width, requested) == expected


def test_summary_once_in_human_output_and_json(tmp_path):
    runner = CliRunner()
    human = runner.invoke(
        app, ["quantize", "-b", "4", "-m", "rtn", "-g", "32", "--no-eval", "-o", str(tmp_path / "human"), "-q"]
    )
    assert human.exit_code == 0, human.output
    lines = [line for line in human.stdout.splitlines() if "grouping" in line or "fallback" in line]
    assert lines == [
        "grouping: 30 layers in groups of 32; 5 layers with in_features 172 in groups of 43 (32 does not divide 172)"
    ]
    result = runner.invoke(
        app,
        [
            "quantize",
            "-b",
            "4",
            "-m",
            "rtn",
            "-g",
            "-1",
            "--embeddings",
            "8",
            "--no-eval",
            "-o",
            str(tmp_path / "channel"),
            "-q",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["grouping"]["summary"] == "grouping: per channel, all 35 integer layers"
    tables = {"model.embed_tokens", "lm_head"}  # the embedding (tied head) has its own int8 grid, groups of 32
    assert {layer["scheme"] for name, layer in report["layers"].items() if name not in tables} == {"channel"}
    assert {name: report["layers"][name]["group_size"] for name in tables} == {"model.embed_tokens": 32, "lm_head": 32}
