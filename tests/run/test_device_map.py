"""--device-map hands placement to accelerate (several GPUs and CPU); on a CPU-only machine it
places everything on the CPU, and the checkpoint is the same as with --device cpu."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantcli.cli.app import app

runner = CliRunner()


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("bnb-int8", 8), ("gptq", 4)])
def test_device_map_auto_gives_the_same_checkpoint(tmp_path, method, bits):
    common = [
        "quantize",
        "--bits",
        str(bits),
        "--method",
        method,
        "--no-eval",
        "--json",
        "--quiet",
        "--calib-samples",
        "8",
        "--seq-len",
        "64",
    ]
    mapped = runner.invoke(app, [*common, "-o", str(tmp_path / "mapped"), "--device-map", "auto"])
    plain = runner.invoke(app, [*common, "-o", str(tmp_path / "plain"), "--device", "cpu"])
    assert mapped.exit_code == 0 and plain.exit_code == 0, mapped.output + plain.output
    assert json.loads(mapped.stdout)["recipe"]["device_map"] == "auto"
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "mapped" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_device_map_is_one_line():
    result = runner.invoke(app, ["quantize", "--bits", "4", "--device-map", "everywhere", "--quiet"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: --device-map must be one of auto, balanced, balanced_low_0, sequential, got 'everywhere'."
    )
