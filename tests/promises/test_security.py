"""Nothing a checkpoint ships is executed unless the user says so: no remote code, no pickles."""

from __future__ import annotations

import pytest
import torch

from quantcli import load
from quantcli.errors import ModelLoadError
from quantcli.sources.models import load_model, load_tokenizer
from tests.support.badfiles import copy_model, pickle_bomb, remote_code_model


def test_remote_code_is_refused_without_the_flag_and_never_imported(tmp_path):
    marker = tmp_path / "ran"
    folder = remote_code_model(tmp_path / "model", marker)
    with pytest.raises(ModelLoadError, match="pass trust_remote_code=True if you trust it"):
        load_model(str(folder), torch.float32, "cpu")
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load(folder, "cpu")
    assert not marker.exists()


def test_remote_code_runs_with_the_flag(tmp_path):
    marker = tmp_path / "ran"
    folder = remote_code_model(tmp_path / "model", marker)
    model = load_model(str(folder), torch.float32, "cpu", trust_remote_code=True)
    assert type(model).__name__ == "EvilModel"
    assert marker.exists()


def test_safetensors_are_loaded_and_a_pickle_beside_them_never_opened(tmp_path, stories_path):
    marker = tmp_path / "ran"
    folder = copy_model(tmp_path / "model")
    pickle_bomb(folder / "pytorch_model.bin", marker)
    model, tokenizer, _ = load(folder, "cpu")
    reference = load_model(stories_path, torch.float32, "cpu")
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert len(tokenizer) == 512
    assert not marker.exists()


def test_a_malicious_pickle_only_checkpoint_fails_cleanly_without_running(tmp_path):
    marker = tmp_path / "ran"
    folder = copy_model(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    pickle_bomb(folder / "pytorch_model.bin", marker)
    load_tokenizer(str(folder))
    with pytest.raises(ModelLoadError, match=f"cannot load a causal LM from {folder}"):
        load_model(str(folder), torch.float32, "cpu")
    assert not marker.exists()
