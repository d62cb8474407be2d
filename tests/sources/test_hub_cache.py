"""A Hub id resolves from the Hugging Face cache ($HF_HOME) with no network, as transformers users expect."""

import json
import os
import shutil
import subprocess
import sys

from quantcli.sources.models import EMBEDDED_MODEL

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_cached_hub_model_loads_offline(tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--karpathy--stories260K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(EMBEDDED_MODEL, repo / "snapshots" / REVISION)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "quantcli",
        "eval",
        "karpathy/stories260K",
        "--max-tokens",
        "512",
        "--json",
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (
        data["model"] == "karpathy/stories260K"
        and data["disk_bytes"] == (EMBEDDED_MODEL / "model.safetensors").stat().st_size
    )

    missing = subprocess.run(
        [*command[:4], "karpathy/not-cached", *command[5:]], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert missing.returncode == 3
    assert missing.stderr.strip().startswith(
        "error: cannot load model 'karpathy/not-cached': it is not a local folder, not in the Hugging Face cache "
        f"({tmp_path / 'hf'}/hub)"
    )
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "hf download karpathy/not-cached" in missing.stderr
