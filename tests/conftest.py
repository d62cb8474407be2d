"""Shared fixtures: the embedded real model, a tiny GPT-2 (Conv1D) built from a config, offline Hub."""

from __future__ import annotations

import contextlib
import os
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny models: one thread is as fast and does not thrash a shared 2-core box

from quantcli.sources.models import EMBEDDED_MODEL  # noqa: E402

PROMPT_IDS = [[1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_path() -> str:
    return str(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def prompt_ids():
    return torch.tensor(PROMPT_IDS)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random GPT-2 (Conv1D layers) saved with the stories260K tokenizer (vocab 512)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)
    return str(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@contextlib.contextmanager
def tmpfs(folder, options: str):
    """A tmpfs mounted at ``folder`` (created) with mount ``options`` for the block; skips the test without root."""
    folder.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        != 0
    ):
        pytest.skip(f"mounting a tmpfs ({options}) needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
