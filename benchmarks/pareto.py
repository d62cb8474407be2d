"""Issue 12's Pareto check on one model: every allocated checkpoint against every uniform scheme measured
on the same held-out text (WikiText-2 articles 1-30, the same windows everywhere), from the result files
the other benchmarks write:

- ``results/<model>/allocation-{rtn,gptq}.json`` (``allocation.py``): the allocated checkpoints, and the
  candidates applied uniformly (the embedding int8, or kept with ``keep``);
- ``results/<model>/methods.json`` (``methods.py``): rtn/gptq/bitsandbytes at 8/4/3 bits and every
  grouping, as ``quantcli quantize`` writes them (the mean over the row's seeds);
- ``results/<model>/wholemodel.json`` (``wholemodel.py``): the defaults, and the embedding kept.

Each file's increase is against the fp32 perplexity measured in its own run. An allocation is Pareto-
optimal here when every uniform scheme whose increase is at most its own is larger on disk. llama.cpp's
own types are listed beside them for reference (their file includes the tokenizer).

    python -m benchmarks.pareto --model smollm2   # writes results/<model>/pareto.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.lib.results import RESULTS, result_stem


def read(model: str, bench: str) -> dict | None:
    path = RESULTS / model / f"{bench}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def uniform_schemes(model: str) -> list[dict]:
    """Every uniform scheme measured on the held-out text: name, bytes on disk, increase (%), source file."""
    schemes = []
    for method in ("rtn", "gptq"):
        data = read(model, f"allocation-{method}")
        for u in (data or {}).get("uniform", [])[1:]:  # the first is the original
            schemes.append(
                {
                    "scheme": f"{u['scheme']} (allocation candidate)",
                    "bytes": u["bytes"],
                    "increase": u["held_out"]["increase_pct"],
                    "source": f"allocation-{method}",
                }
            )
    methods = read(model, "methods")
    for row in (methods or {}).get("rows", [])[1:]:
        if "delta_percent" in row:
            seeds = len(row.get("seeds") or [])
            schemes.append(
                {
                    "scheme": row["label"] + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
                    "bytes": row["disk_bytes"],
                    "increase": row["delta_percent"],
                    "source": "methods",
                }
            )
    whole = read(model, "wholemodel")
    for row in (whole or {}).get("rows", []):
        fp32 = whole["fp32_perplexity"]
        schemes.append(
            {
                "scheme": f"{row['row']} (wholemodel.py{', ' + str(row['fields']) if row.get('fields') else ''})",
                "bytes": row["disk_bytes"],
                "increase": 100 * (row["perplexity"] - fp32) / fp32,
                "source": "wholemodel",
            }
        )
    return schemes


def llamacpp_types(model: str) -> list[dict]:
    """llama.cpp's own quantizer's files, scored by llama.cpp on the same ids (``llamacpp.py``), change against
    HF fp32."""
    data = read(model, "llamacpp")
    return [
        {"scheme": r["type"], "bytes": r["file_bytes"], "increase": r["delta_pct_vs_hf_fp32"]}
        for r in (data or {}).get("rows", [])
        if r["type"].startswith("llama.cpp") and r["type"] not in ("llama.cpp F32", "llama.cpp F16")
    ]


def allocations(model: str) -> list[dict]:
    rows = []
    for method in ("rtn", "gptq"):
        data = read(model, f"allocation-{method}")
        for r in (data or {}).get("rows", []):
            if "refused" in r:
                rows.append({"method": method, "target": r["target_pct"], "refused": r["refused"]})
            else:
                rows.append(
                    {
                        "method": method,
                        "target": r["target_pct"],
                        "bytes": r["bytes"],
                        "increase": r["held_out"]["increase_pct"],
                    }
                )
    return rows


def judge(row: dict, schemes: list[dict]) -> dict:
    rivals = [s for s in schemes if s["increase"] <= row["increase"]]
    best = min(rivals, key=lambda s: s["bytes"], default=None)
    return {
        **row,
        "rivals": len(rivals),
        "best_rival": best,
        "pareto": all(s["bytes"] > row["bytes"] for s in rivals),
        "within_1_25x": row["increase"] <= 1.25 * row["target"],
    }


def markdown(model: str, judged: list[dict], schemes: list[dict], llama: list[dict]) -> str:
    lines = [
        f"{model}: per-layer allocation against every uniform scheme measured on the same held-out text (WikiText-2"
        " articles 1-30, 16,384 tokens, windows of 512).",
        "",
        "| method | target | size on disk | held-out Δppl | ≤ 1.25× target | uniform schemes as good | smallest of"
        " them | bytes saved | Pareto |",
        "|---|---:|---:|---:|---|---:|---|---:|---|",
    ]
    for r in judged:
        if "refused" in r:
            lines.append(f"| {r['method']} | +{r['target']:g}% | refused: {r['refused']} | | | | | | |")
            continue
        best = r["best_rival"]
        rival = f"{best['scheme']}, {best['bytes'] / 1e6:.2f} MB, {best['increase']:+.2f}%" if best else "none"
        saved = f"{(best['bytes'] - r['bytes']) / 1e6:.2f} MB" if best else ""
        lines.append(
            f"| {r['method']} | +{r['target']:g}% | {r['bytes'] / 1e6:.2f} MB | {r['increase']:+.2f}% |"
            f" {'yes' if r['within_1_25x'] else 'NO'} |"
            f" {r['rivals']} | {rival} | {saved} | {'yes' if r['pareto'] else 'NO'} |"
        )
    lines += ["", "| uniform scheme | size on disk | held-out Δppl | from |", "|---|---:|---:|---|"]
    for s in sorted(schemes, key=lambda s: s["bytes"]):
        lines.append(f"| {s['scheme']} | {s['bytes'] / 1e6:.2f} MB | {s['increase']:+.2f}% | {s['source']} |")
    lines += [
        f"| {s['scheme']} | {s['bytes'] / 1e6:.2f} MB | {s['increase']:+.2f}% | llamacpp (reference) |" for s in llama
    ]
    return "\n".join(lines) + "\n"


def plot(model: str, judged: list[dict], schemes: list[dict], llama: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    floor = 1e-2  # increases at or below zero are drawn on the floor of the log axis
    for points, style, label in (
        (schemes, dict(marker="s", color="tab:blue"), "uniform (quantcli)"),
        (llama, dict(marker="^", color="tab:gray"), "llama.cpp types"),
    ):
        axes.scatter(
            [s["bytes"] / 1e6 for s in points], [max(s["increase"], floor) for s in points], label=label, **style
        )
    for method, color in (("rtn", "tab:orange"), ("gptq", "tab:red")):
        done = sorted((r for r in judged if r["method"] == method and "refused" not in r), key=lambda r: r["bytes"])
        axes.plot(
            [r["bytes"] / 1e6 for r in done],
            [max(r["increase"], floor) for r in done],
            marker="*",
            markersize=12,
            color=color,
            label=f"allocated ({method})",
        )
        for r in done:
            axes.annotate(
                f"+{r['target']:g}%",
                (r["bytes"] / 1e6, max(r["increase"], floor)),
                textcoords="offset points",
                xytext=(4, -11),
                fontsize=8,
                color=color,
            )
    axes.set_yscale("log")
    axes.set(
        xlabel="size on disk (MB)", ylabel="held-out perplexity increase (%)", title=f"{model}: allocated vs uniform"
    )
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="The results folder's model name (results/<model>/*.json).")
    args = parser.parse_args()
    schemes, llama = uniform_schemes(args.model), llamacpp_types(args.model)
    judged = [row if "refused" in row else judge(row, schemes) for row in allocations(args.model)]
    out = result_stem(args.model, "pareto")
    out.with_suffix(".md").write_text(markdown(args.model, judged, schemes, llama))
    out.with_suffix(".json").write_text(
        json.dumps({"allocations": judged, "uniform": schemes, "llamacpp": llama}, indent=2) + "\n"
    )
    plot(args.model, judged, schemes, llama, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
