"""Refuse, before transformers is asked, a local checkpoint that ships its own Python code (an
``auto_map`` in config.json or tokenizer_config.json) unless the user passed --trust-remote-code.
transformers is also always called with ``trust_remote_code`` set, so it never prompts on stdout."""

from __future__ import annotations

from pathlib import Path

from quantcli.errors import ModelLoadError, option
from quantcli.sources.model_files import read_json

REMOTE_CODE_HINT = (
    "{source} ships its own Python code (auto_map in its config), which quantcli does not run by default."
    f" Read that code, then pass {option('trust_remote_code', True)} if you trust it."
)
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def ships_code(folder: Path) -> bool:
    for name in CONFIG_FILES:
        data = read_json(folder / name)  # bounded, regular files only
        if isinstance(data, dict) and data.get("auto_map"):
            return True
    return False


def refuse_remote_code(source: str | Path, trust_remote_code: bool) -> None:
    folder = Path(source)
    if not trust_remote_code and folder.is_dir() and ships_code(folder):
        raise ModelLoadError(REMOTE_CODE_HINT.format(source=source))
