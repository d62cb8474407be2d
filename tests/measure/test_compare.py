"""`quantcli compare` over two real RTN checkpoints (8- and 4-bit), its Markdown table and --plot PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantcli.config.quantize import EvalConfig
from quantcli.config.recipes import config_from_mapping
from quantcli.measure.compare import compare, markdown
from quantcli.run.pipeline import quantize

EVAL = {"max_tokens": 1024, "seq_len": 128}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for bits in (8, 4):
        quantize(
            config_from_mapping({"bits": bits, "method": "rtn", "output": str(root / f"rtn-w{bits}"), "eval": EVAL})
        )
    return [root / "rtn-w8", root / "rtn-w4"]


def test_rows_from_reports_and_markdown(checkpoints):
    result = compare(checkpoints)
    w8, w4 = result["rows"]
    assert (w8["bits"], w4["bits"]) == (8, 4) and not w8["evaluated"]
    assert w4["disk_bytes"] < w8["disk_bytes"] and w4["bits_per_weight"] < w8["bits_per_weight"]
    assert w8["perplexity_delta_percent"] < w4["perplexity_delta_percent"]
    table = markdown(result).splitlines()
    assert table[0].startswith("| checkpoint | method | bits |") and table[1].startswith("|---|")
    assert table[2].startswith("| `rtn-w8` | rtn | 8 |") and table[3].startswith("| `rtn-w4` |")
    assert table[5].startswith("Perplexities from each checkpoint's report.json, all measured on tinystories:eval")


def test_cli_against_base_with_plot(checkpoints, tmp_path):
    from PIL import Image

    png = tmp_path / "trade-off.png"
    args = [
        "compare",
        *map(str, checkpoints),
        "--base",
        "stories260K",
        "--max-tokens",
        "1024",
        "--seq-len",
        "128",
        "--plot",
        str(png),
        "--json",
        "-q",
    ]
    result = subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    w8, w4 = data["rows"]
    assert (
        w8["evaluated"]
        and 0 <= w8["kl_divergence"] < w4["kl_divergence"]
        and w8["top1_agreement"] > w4["top1_agreement"]
    )
    assert w8["base_perplexity"] == w4["base_perplexity"]
    errors8, errors4 = data["layer_errors"][str(checkpoints[0])], data["layer_errors"][str(checkpoints[1])]
    assert len(errors8) == 35 and "model.embed_tokens" not in errors8  # the embedding and its tied head kept by default
    assert all(0 < errors8[name] < 0.02 < errors4[name] < 0.3 for name in errors8)
    assert png.stat().st_size > 10_000
    assert Image.open(png).size == (1560, 600)


def test_plot_needs_png(checkpoints, tmp_path):
    from quantcli.errors import InputError

    with pytest.raises(InputError, match="png"):
        compare(checkpoints[:1], plot=tmp_path / "x.jpg", config=EvalConfig(max_tokens=256))


def test_layer_errors_dequantize_bitsandbytes_storage(tmp_path):
    """bnb keeps packed 4-bit / int8 rows; the per-layer error must compare dequantized values."""
    import quantcli
    from quantcli.config.quantize import QuantizeConfig
    from quantcli.measure.plot import layer_errors

    for method, bits, low, high in [("bnb-int8", 8, 1e-3, 0.05), ("bnb-nf4", 4, 0.03, 0.3)]:
        report = quantcli.quantize(QuantizeConfig(bits=bits, method=method, output=tmp_path / method, eval=None))
        kept = {
            name for name, layer in report.layers.items() if layer.note
        }  # AVX512-BF16 CPUs keep 172-wide nf4 layers in fp32
        errors = layer_errors(str(tmp_path / method), "stories260K")
        assert len(errors) == 35 and all(e == 0 if name in kept else low < e < high for name, e in errors.items()), (
            method,
            errors,
        )


def test_rows_carry_their_settings_and_mixed_settings_are_flagged(tmp_path):
    import quantcli
    from quantcli.config.quantize import EvalConfig, QuantizeConfig
    from quantcli.measure.compare import compare, markdown

    for name, tokens in (("a", 1024), ("b", 2048)):
        quantcli.quantize(
            QuantizeConfig(bits=8, method="rtn", output=tmp_path / name, eval=EvalConfig(max_tokens=tokens))
        )
    same = compare([tmp_path / "a", tmp_path / "a"])
    assert same["rows"][0]["settings"]["tokens"] == 1024
    assert (
        "all measured on tinystories:eval, 1024 tokens, context 256, stride 256, protocol stream, BOS auto"
        in markdown(same)
    )
    assert "different settings; pass --base MODEL" in markdown(compare([tmp_path / "a", tmp_path / "b"]))


def test_the_base_is_loaded_once_for_all_rows(checkpoints, monkeypatch):
    import quantcli.checkpoint.load
    import quantcli.measure.compare
    import quantcli.measure.evaluation

    loads = []
    real = quantcli.checkpoint.load.load

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(quantcli.checkpoint.load, "load", counting)
    monkeypatch.setattr(quantcli.measure.evaluation, "load", counting)
    monkeypatch.setattr(quantcli.measure.compare, "load", counting)
    result = compare(checkpoints, "stories260K", EvalConfig(max_tokens=512, seq_len=128))
    assert loads.count("stories260K") == 1 and len(loads) == 3
    assert all(row["evaluated"] and row["kl_divergence"] > 0 for row in result["rows"])
