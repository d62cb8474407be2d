"""Fuzzing: recipes and checkpoints, however malformed, raise only QuantCliError subclasses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantcli import load
from quantcli.checkpoint.metadata import METADATA_FILE, read_metadata
from quantcli.config.recipes import config_from_mapping, load_recipe
from quantcli.errors import QuantCliError
from quantcli.methods import get_method
from tests.support.badfiles import quantized_checkpoint

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = [
    "bits",
    "model",
    "method",
    "output",
    "force",
    "skip_modules",
    "method_options",
    "calibration",
    "eval",
    "device",
    "dtype",
    "trust_remote_code",
    "max_shard_size",
    "group_size",
    "symmetric",
    "dataset",
    "samples",
    "seq_len",
    "seed",
    "stride",
    "max_tokens",
    "bos",
    "batch_size",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            4,
            8,
            16,
            3,
            -1,
            0,
            64,
            "rtn",
            "cast",
            "bnb-nf4",
            "cpu",
            "cuda:0",
            "auto",
            "float16",
            "200KB",
            "2GB",
            "none",
            "start",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
recipes = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8) | st.integers(), values, max_size=8)


def build(recipe):
    config = config_from_mapping(recipe)
    return get_method(config.method or "rtn").make_config(config.bits, config.method_options)


@FAST
@given(recipe=recipes)
def test_recipe_mappings_raise_only_quantcli_errors(recipe):
    try:
        build(recipe)
    except QuantCliError as error:
        assert "\n" not in str(error)


@FAST
@given(
    text=st.text(max_size=200)
    | st.sampled_from(["bits: 4\n", "bits: [4\n", "- 1\n", "bits: !!python/object:os.system x\n", "a: &x [*x]\n"])
)
def test_recipe_files_raise_only_quantcli_errors(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        build(load_recipe(path))
    except QuantCliError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@FAST
@given(
    data=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.builds(
        lambda version, extra: json.dumps({"format_version": version, **extra}).encode(),
        json_values,
        st.dictionaries(st.text(max_size=5), json_values, max_size=2),
    )
)
def test_metadata_reader_raises_only_checkpoint_errors(tmp_path, data):
    (tmp_path / METADATA_FILE).write_bytes(data)
    try:
        metadata = read_metadata(tmp_path)
    except QuantCliError:
        return
    assert isinstance(metadata, dict) and metadata["format_version"] == 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory.mktemp("fuzz") / "rtn4")


FILES = ["model.safetensors", "config.json", METADATA_FILE, "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.slow
@SLOW
@given(
    name=st.sampled_from(FILES),
    kind=st.sampled_from(["truncate", "overwrite", "delete"]),
    where=st.floats(0, 1),
    junk=st.binary(min_size=1, max_size=16),
)
def test_loading_a_corrupted_checkpoint_raises_only_quantcli_errors(
    checkpoint, tmp_path_factory, name, kind, where, junk
):
    copy = Path(shutil.copytree(checkpoint, tmp_path_factory.mktemp("corrupt") / "ckpt"))
    path = copy / name
    data = path.read_bytes()
    at = int(where * len(data))
    if kind == "truncate":
        path.write_bytes(data[:at])
    elif kind == "overwrite":
        path.write_bytes(data[:at] + junk + data[at + len(junk) :])
    else:
        path.unlink()
    try:
        load(copy, "cpu")
    except QuantCliError as error:
        assert "\n" not in str(error)
    finally:
        shutil.rmtree(copy.parent)
