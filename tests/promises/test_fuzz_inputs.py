"""A small sample of the GGUF and resume-state fuzzing pass (tools/fuzz_inputs.py; the full pass of 500
variants each is a documented command, docs/ROBUST.md): no variant crashes, hangs, or resumes into a model
other than the uninterrupted run's."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support.models import REPO

pytest.importorskip("gguf")

TOOL = REPO / "tools" / "fuzz_inputs.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gguf_variants_are_refused_or_load_without_crash_or_hang(fuzz, tmp_path):
    outcomes = fuzz.fuzz_gguf(12, seed=7, timeout=60, work=tmp_path)
    assert sum(outcomes.values()) == 12
    assert not [key for key in outcomes if key.startswith(("crash", "hang"))], outcomes
    assert outcomes["refused"] >= 6  # header flips and cuts are mostly structural


def test_resume_state_variants_are_refused_never_spliced(fuzz, tmp_path):
    outcomes = fuzz.fuzz_resume(12, seed=7, timeout=60, work=tmp_path)
    assert outcomes == {"refused": 12}
