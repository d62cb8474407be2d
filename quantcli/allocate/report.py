"""How an allocation is shown: the per-layer map for quantcli.json, summary lines for the terminal,
and ``--plot``'s size/quality picture (matplotlib, optional like ``compare --plot``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.errors import option
from quantcli.measure.plot import pyplot

UNITS = {"ppl_increase": "%", "kl": " nats/token", "size": " bytes", "bpw": " bits/weight"}


def allocation_map(summary: dict[str, Any]) -> dict[str, Any]:
    """What quantcli.json keeps: the target and each layer's choice (kept layers included)."""
    return {
        "target": summary["target"],
        "candidates": summary["candidates"],
        "layers": {
            name: {key: layer[key] for key in ("choice", "bits", "group_size")}
            for name, layer in summary["layers"].items()
        },
    }


def describe(summary: dict[str, Any]) -> list[str]:
    """A few lines: the target, what was chosen, predicted vs measured, the proxy check, the uniform comparison."""
    target, result, check, texts = summary["target"], summary["result"], summary["proxy_check"], summary["texts"]
    choices = ", ".join(
        f"{count} {name}" for name, count in sorted(result["choices"].items(), key=lambda item: -item[1])
    )
    lines = [
        f"allocation: target {target['kind'].replace('_', ' ')} {target['value']:g}{UNITS[target['kind']]} · "
        f"{summary['method']} · layers: {choices}",
        f"allocation: predicted KL {result['predicted_kl']:.5f} (perplexity {result['predicted_ppl_increase']:+.2f}%), "
        f"measured on {texts['verify']}"
        f" ({texts['verify_tokens']} tokens, {texts['verify_windows']} windows): KL {result['measured_kl']:.5f} (upper "
        f"bound {result['measured_kl_upper']:.5f}),"
        f" perplexity {result['measured_ppl_increase']:+.2f}% (upper bound "
        f"{result['measured_ppl_increase_upper']:+.2f}%) at {result['confidence']:.0%} confidence"
        f" · round {summary['chosen_round']} of {len(summary['rounds'])}",
    ]
    if check["spearman"] is not None:
        lines.append(
            f"allocation: proxy vs measured single-layer KL on {texts['search']}: Spearman {check['spearman']:.3f} "
            f"over {len(check['pairs'])} pairs, scale {check['scale']:.3g}"
        )
    best = summary["best_uniform"]
    if best:
        lines.append(
            f"allocation: {result['bytes']:,} bytes vs {best['bytes']:,} for the best uniform scheme meeting the "
            f"target ({best['candidate']}):"
            f" {summary['bytes_saved_vs_best_uniform']:+,} bytes saved"
        )
    else:
        lines.append("allocation: no uniform scheme among the candidates meets the target")
    if texts["verify"] in (texts["calibration"], texts["search"]):
        lines.append(
            "allocation: warning: the verification text is also the calibration or search text; pass a held-out "
            f"{option('allocation.verify_dataset')}"
        )
    return lines


def plot_allocation(summary: dict[str, Any], path: Path) -> Path:
    """Size on disk vs KL: the predicted curve the solver searched, each verified round, and every
    uniform scheme (predicted and measured) on the same axes."""
    plt = pyplot(path)
    figure, axes = plt.subplots(figsize=(8, 5.5))
    curve = summary["frontier"]
    axes.plot(
        [p["bytes"] / 1e6 for p in curve],
        [p["predicted_kl"] for p in curve],
        "-",
        color="grey",
        label="allocations searched (predicted)",
    )
    for uniform in summary["uniform"]:
        size = uniform["bytes"] / 1e6
        if uniform["measured"]:
            axes.scatter(size, uniform["measured"]["kl"], marker="s", color="tab:blue")
        axes.scatter(size, uniform["predicted_kl"], marker="s", facecolors="none", edgecolors="tab:blue")
        axes.annotate(
            uniform["candidate"], (size, uniform["predicted_kl"]), textcoords="offset points", xytext=(5, 3), fontsize=8
        )
    for number, attempt in enumerate(summary["rounds"], 1):
        chosen = number == summary["chosen_round"]
        axes.scatter(
            attempt["bytes"] / 1e6,
            attempt["measured"]["kl"],
            marker="*" if chosen else "o",
            s=160 if chosen else 40,
            color="tab:red",
            label="allocated (measured)" if chosen else None,
        )
        axes.annotate(
            f"round {number}",
            (attempt["bytes"] / 1e6, attempt["measured"]["kl"]),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=8,
        )
    axes.scatter([], [], marker="s", color="tab:blue", label="uniform (measured)")
    axes.scatter([], [], marker="s", facecolors="none", edgecolors="tab:blue", label="uniform (predicted)")
    if summary["target"]["kind"] == "kl":
        axes.axhline(summary["target"]["value"], color="tab:red", linestyle="--", label="target")
    if summary["target"]["bytes"]:
        axes.axvline(summary["target"]["bytes"] / 1e6, color="tab:red", linestyle="--", label="target")
    axes.set_yscale("log")
    axes.set(
        xlabel="checkpoint size on disk (MB)",
        ylabel=f"KL vs original (nats/token, {summary['texts']['verify']})",
        title=f"per-layer allocation, target {summary['target']['kind'].replace('_', ' ')} "
        f"{summary['target']['value']:g}",
    )
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
