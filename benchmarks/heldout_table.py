"""Issue 26's one table: every row measured on the held-out protocol (``benchmarks/lib/heldout.py``) by the
suites that own them (anchors: llama.cpp ± imatrix, AutoRound, quantcli's GPTQ; gguf_heldout; gptq_variants;
blockwise), grouped by grid, with quantcli's best row against the issue's bars: at Q4_0 and Q4_K_M bytes at
most 0.5x llama.cpp + imatrix's increase; at W4 g64/g128 at most 0.7x AutoRound's (200 iterations); at 3 bits
(Q3_K_M, W3 g64) at most 0.7x both. Reads the suites' result files, measures nothing:
``python -m benchmarks.heldout_table`` writes ``results/smollm2/heldout.{json,md}``.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.lib.heldout import SETTINGS
from benchmarks.lib.results import result_stem

SUITES = ("anchors", "gguf-heldout", "gptq-variants", "blockwise")
GRIDS = ("Q4_0", "IQ4_XS", "Q4_K_M", "Q3_K_M", "W4 g128", "W4 g64", "W3 g64")
BARS = {  # grid: (anchor row, largest ratio of quantcli's increase to the anchor's)
    "Q4_0": ("llamacpp-q4_0-imatrix", 0.5),
    "Q4_K_M": ("llamacpp-q4_k_m-imatrix", 0.5),
    "Q3_K_M": ("llamacpp-q3_k_m-imatrix", 0.7),
    "W4 g128": ("autoround-default-w4g128", 0.7),
    "W4 g64": ("autoround-default-w4g64", 0.7),
    "W3 g64": ("autoround-default-w3g64", 0.7),
}


def collect() -> list[dict[str, Any]]:
    """Every stored row of the suites, tagged with the suite it came from (the first of equal labels kept)."""
    rows, seen = [], set()
    for suite in SUITES:
        path = result_stem("smollm2", suite).with_suffix(".json")
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row.get("grid") in GRIDS and row["row"] not in seen:
                seen.add(row["row"])
                rows.append({**row, "suite": suite})
    return rows


def quantizer(row: dict[str, Any]) -> str:
    """Who made the row's weights: the anchors suite names its peers' runtimes; every other suite's rows are
    quantcli's (their ``runtime`` says who scored a GGUF file), or a change since reverted (``reverted``: the
    commit), shown but never quantcli's best."""
    if row["suite"] == "anchors":
        return row["runtime"]
    return f"quantcli, reverted in {row['reverted']}" if row.get("reverted") else "quantcli"


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid with a bar: quantcli's best row by increase and by KL, against the anchor's."""
    out = []
    for grid, (anchor_name, bar) in BARS.items():
        anchor = next((r for r in rows if r["row"] == anchor_name), None)
        ours = [r for r in rows if r["grid"] == grid and quantizer(r) == "quantcli"]
        if anchor is None or not ours:
            out.append({"grid": grid, "anchor": anchor_name, "bar": bar, "measured": False})
            continue
        best = min(ours, key=lambda r: r["increase_pct"])
        best_kl = min(ours, key=lambda r: r["kl_divergence"])
        ratio = best["increase_pct"] / anchor["increase_pct"]
        out.append(
            {
                "grid": grid,
                "anchor": anchor_name,
                "bar": bar,
                "measured": True,
                "best": best["row"],
                "increase_ratio": ratio,
                "met": ratio <= bar,
                "best_kl": best_kl["row"],
                "kl_ratio": best_kl["kl_divergence"] / anchor["kl_divergence"],
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], bars: list[dict[str, Any]]) -> str:
    lines = [
        "# Beyond GPTQ (issue 26): every quantizer on one held-out protocol",
        "",
        f"SmolLM2-135M-Instruct (weights dequantized from its Q4_1 GGUF). Protocol: {json.dumps(SETTINGS)}. GGUF rows"
        " are scored by llama.cpp on quantcli's token ids, their increase against the F32 GGUF; the others by"
        " quantcli.evaluate against fp32. KL is to SmolLM2 fp32 for every row. Rows come from the suites named in"
        " the last column (their own files give each row's settings and machine).",
        "",
        "| grid | row | quantizer | bytes | bits/weight | perplexity | Δ ppl | KL | top-1 | quantize s | suite |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for grid in GRIDS:
        for r in sorted((r for r in rows if r["grid"] == grid), key=lambda r: r["increase_pct"]):
            lines.append(
                f"| {grid} | {r['row']} | {quantizer(r)} | {r['file_bytes']:,} | {r['bits_per_weight']:.2f} |"
                f" {r['perplexity']:.3f} | {r['increase_pct']:+.2f}% | {r['kl_divergence']:.4f} |"
                f" {r['top1_agreement']:.3f} | {r.get('quantize_s') or 0:.0f} | {r['suite']} |"
            )
    lines += [
        "",
        "| grid | bar (quantcli / anchor) | anchor | quantcli's best by Δ ppl | ratio | met | best by KL | KL ratio |",
    ]
    lines.append("|---|--:|---|---|--:|---|---|--:|")
    for v in bars:
        if not v["measured"]:
            lines.append(f"| {v['grid']} | {v['bar']} | {v['anchor']} | not measured | | | | |")
            continue
        lines.append(
            f"| {v['grid']} | {v['bar']} | {v['anchor']} | {v['best']} | {v['increase_ratio']:.2f} |"
            f" {'yes' if v['met'] else 'no'} | {v['best_kl']} | {v['kl_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = collect()
    bars = verdicts(rows)
    stem = result_stem("smollm2", "heldout")
    stem.with_suffix(".json").write_text(
        json.dumps({"settings": SETTINGS, "rows": rows, "bars": bars}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(markdown(rows, bars))
    print(markdown(rows, bars))


if __name__ == "__main__":
    main()
