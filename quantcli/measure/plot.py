"""Pictures for ``quantcli compare --plot``: the size vs perplexity trade-off, and each layer's
quantization error (relative Frobenius norm of dequantized minus original weights).

matplotlib is an optional extra: ``pip install 'quantcli[plot]'``. The Agg backend draws without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.checkpoint.load import load
from quantcli.errors import InputError, UnavailableError, option
from quantcli.quant.layers import dense_weight_matrix, weight_matrix


def layer_errors(checkpoint: str, reference: str) -> dict[str, float]:
    """``||W_q - W|| / ||W||`` of every quantized layer of ``checkpoint`` against ``reference``'s weights."""
    import torch

    quantized, _, metadata = load(checkpoint, "cpu")
    original = load(reference, "cpu")[0]
    modules_q, modules_o = dict(quantized.named_modules()), dict(original.named_modules())
    errors: dict[str, float] = {}
    for name in (metadata or {}).get("layers") or {}:
        if name not in modules_o:
            raise InputError(
                f"{checkpoint} has layer {name} that {reference} lacks: pass the model it was quantized from as "
                f"{option('base')}."
            )
        w_q, w_o = dense_weight_matrix(modules_q[name]), weight_matrix(modules_o[name]).float()
        errors[name] = (torch.linalg.norm(w_q - w_o) / torch.linalg.norm(w_o)).item()
    return errors


def pyplot(path: Path) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, after checking it is installed and ``path`` is a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise UnavailableError(
            f"{option('plot')} needs matplotlib: pip install 'quantcli[plot]' (or pip install matplotlib)."
        ) from None
    if path.suffix.lower() != ".png":
        raise InputError(f"{option('plot', path)}: write a .png file.")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(rows: list[dict[str, Any]], errors: dict[str, dict[str, float]], path: Path) -> Path:
    """Write a two-panel PNG: (a) size on disk vs perplexity, (b) per-layer relative error."""
    plt = pyplot(path)
    figure, (trade_off, per_layer) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    for row in rows:
        label = f"{row['method']} {row['bits']}-bit ({Path(row['checkpoint']).name})"
        trade_off.scatter(row["disk_bytes"] / 1e6, row["perplexity"], s=60, label=label)
        trade_off.annotate(
            f"{row['method']} w{row['bits']}",
            (row["disk_bytes"] / 1e6, row["perplexity"]),
            textcoords="offset points",
            xytext=(6, 4),
        )
    base_ppl = next((row["base_perplexity"] for row in rows if row["base_perplexity"]), None)
    if base_ppl:
        trade_off.axhline(base_ppl, color="grey", linestyle="--", label=f"base perplexity {base_ppl:.3f}")
    trade_off.set(xlabel="size on disk (MB)", ylabel="perplexity (lower is better)", title="(a) size vs perplexity")
    trade_off.margins(0.2)
    trade_off.legend(fontsize=8)
    trade_off.grid(alpha=0.3)
    names = list(dict.fromkeys(name for layer_map in errors.values() for name in layer_map))
    for row in rows:
        layer_map = errors[row["checkpoint"]]
        per_layer.plot(
            range(len(names)),
            [layer_map.get(name, float("nan")) for name in names],
            marker="o",
            markersize=3,
            label=f"{row['method']} {row['bits']}-bit",
        )
    per_layer.set_yscale("log")
    per_layer.set_xticks(
        range(len(names)),
        [name.removeprefix("model.").replace("layers.", "L") for name in names],
        rotation=90,
        fontsize=6,
    )
    per_layer.set(ylabel="relative Frobenius error ||Wq - W|| / ||W||", title="(b) per-layer weight error")
    per_layer.legend(fontsize=8)
    per_layer.grid(alpha=0.3, which="both")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
