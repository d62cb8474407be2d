"""Which integer grid to default to: round-to-nearest with each grid on one model, in one process.

    python -m benchmarks.grid --sweep int4        # writes results/smollm2/grid-int4.{json,md}
    python -m benchmarks.grid --sweep int8        # results/smollm2/grid-int8.*
    python -m benchmarks.grid --sweep embedding   # results/smollm2/grid-embedding.*
    python -m benchmarks.grid --sweep int4 --rows mse-g32 --model FOLDER

Needs ``make smollm2`` (the default ``--model``). The model is loaded once; every row restores the fp32
weights, rounds to nearest what its sweep rounds (in memory: no checkpoint is written; the pipeline's
files reload to the same values, tests/methods/test_wholemodel.py) and scores the standard WikiText windows
(``benchmarks/lib/setups.py``). Each row is saved as it finishes, beside the rows of earlier runs; the
``fp32`` row (nothing rounded) gives every row its change in perplexity.

- ``int4``: every Linear layer at 4 bits (the group rule of :func:`quantcli.quant.intgrid.group_size_for`)
  and the tied embedding/head at 8 bits per row, with each observer and group size: ``minmax``
  (absmax/7.5), ``signed`` (Q4_0's rule: the largest-magnitude weight on code -8, signed scale) and
  ``mse`` (clipped range by an error search). GPTQ rows come from ``benchmarks/wholemodel.py``.
- ``int8``: every Linear layer at 8 bits per channel and the embedding/head in groups of 64 with each
  observer, the scales rounded to each dtype before the integers are chosen (as the pipeline does),
  the kept tensors rounded to bfloat16.
- ``embedding``: only the tied embedding/head at 8 bits (minmax, fp32 scales), per row and in groups
  of 64 and 32; every other tensor stays fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.lib import setups
from quantcli.config.quantize import EvalConfig
from quantcli.measure.evaluation import measure_perplexity
from quantcli.progress import NullProgress
from quantcli.quant import ops
from quantcli.quant.intgrid import plan_layouts
from quantcli.quant.keptdtype import round_kept
from quantcli.quant.layers import select_modules, set_weight_matrix, weight_matrix
from quantcli.sources.models import load_model, load_tokenizer

INT8_EMBEDDING_GROUP = 64


@dataclass(frozen=True)
class Sweep:
    rows: list[str]  # every row's name; "fp32" rounds nothing
    defaults: list[str]  # the rows a run without --rows measures
    about: dict[str, str]  # what every row shares, for the result's settings
    apply: Callable[[Any, str], dict[str, Any]]  # rounds the model as the row says; returns the row's fields


def int4(model: Any, row: str) -> dict[str, Any]:
    observer, group = row.split("-g")[0], int(row.split("-g")[1])
    modules = dict(model.named_modules())
    for name, layout in plan_layouts(model, select_modules(model).names, 4, True, group, observer).items():
        set_weight_matrix(
            modules[name], ops.fake_quantize(weight_matrix(modules[name]), 4, True, layout.group_size, observer)
        )
    table = model.get_input_embeddings().weight
    table.data.copy_(ops.fake_quantize(table.data, 8, True, None))
    return {"method": "rtn", "bits": 4, "group_size": group, "observer": observer, "embedding": "int8 per row"}


def int8(model: Any, row: str) -> dict[str, Any]:
    observer, dtype = row.split("-")
    modules = dict(model.named_modules())
    selection = select_modules(model, tables=True)
    layers = selection.names + selection.tables
    for name in layers:
        matrix, group = weight_matrix(modules[name]), INT8_EMBEDDING_GROUP if name in selection.tables else None
        scale, zero_point = ops.compute_qparams(matrix, 8, True, group, observer, getattr(torch, dtype))
        quantized = ops.quantize(matrix, scale, zero_point, 8, group)
        set_weight_matrix(modules[name], ops.dequantize(quantized, scale, zero_point, group))
    round_kept(model, set(layers), torch.bfloat16)
    return {"observer": observer, "scale_dtype": dtype}


def embedding(model: Any, row: str) -> dict[str, Any]:
    group = None if row == "int8-per-row" else int(row.removeprefix("int8-g"))
    weight = model.get_input_embeddings().weight
    original = weight.data.clone()
    scale, zero_point = ops.compute_qparams(original, 8, True, group, "minmax")
    weight.data.copy_(ops.dequantize(ops.quantize(original, scale, zero_point, 8, group), scale, zero_point, group))
    scales = original.shape[0] * (1 if group is None else original.shape[1] // group)
    return {"grid": "int8 per row" if group is None else f"int8 groups of {group}", "scale_bytes": 4 * scales}


INT4_ROWS = [f"{observer}-g{group}" for group in (32, 64) for observer in ("minmax", "signed", "mse")]
INT8_ROWS = ["minmax-float32", "minmax-float16", "minmax-bfloat16", "signed-float32", "signed-bfloat16"]
EMBEDDING_ROWS = ["fp32", "int8-per-row", "int8-g64", "int8-g32"]
SWEEPS = {
    "int4": Sweep(["fp32", *INT4_ROWS], INT4_ROWS, {"embedding": "int8 per row (tied head)"}, int4),
    "int8": Sweep(
        ["fp32", *INT8_ROWS],
        INT8_ROWS,
        {"layers": "Linear per channel, embedding/head in groups of 64, kept tensors bfloat16"},
        int8,
    ),
    "embedding": Sweep(
        EMBEDDING_ROWS, EMBEDDING_ROWS, {"layers": "only the tied embedding/head rounded, the rest fp32"}, embedding
    ),
}


def markdown(sweep: str, data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"# {sweep} grids on {s['model']} (round-to-nearest)",
        "",
        json.dumps(s),
        "",
        "| row | perplexity | change vs fp32 |",
        "|---|--:|--:|",
    ]
    for r in data["rows"]:
        change = "" if r.get("delta_pct") is None else f"{r['delta_pct']:+.3f}%"
        lines.append(f"| {r['row']} | {r['perplexity']:.4f} | {change} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--sweep", required=True, choices=sorted(SWEEPS))
    parser.add_argument("--rows", nargs="+", help="Rows to run (default: the sweep's; see --list-rows).")
    parser.add_argument("--list-rows", action="store_true", help="Print the sweep's rows and exit.")
    parser.set_defaults(model="smollm2")
    args = parser.parse_args()
    sweep = SWEEPS[args.sweep]
    if args.list_rows:
        print(" ".join(sweep.rows))
        return
    unknown = sorted(set(args.rows or []) - set(sweep.rows))
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: the {args.sweep} sweep has {' '.join(sweep.rows)}")
    setup = setups.resolve(args)
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    tokenizer, model = load_tokenizer(setup.path), load_model(setup.path, torch.float32, "cpu")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    out = setup.output(f"grid-{args.sweep}")
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}
    data["settings"] = {"eval": vars(evaluation), "model": setup.label, "caveat": setup.caveat, **sweep.about}
    for name in args.rows or sweep.defaults:
        model.load_state_dict(original)
        start = time.perf_counter()
        fields = {} if name == "fp32" else sweep.apply(model, name)
        perplexity = measure_perplexity(model, tokenizer, evaluation, NullProgress(), "rtn").perplexity
        row = {"row": name, **fields, "perplexity": perplexity, "seconds": time.perf_counter() - start}
        data["rows"] = [r for r in data["rows"] if r.get("row") != name] + [row]
        base = next((r["perplexity"] for r in data["rows"] if r["row"] == "fp32"), None)
        for r in data["rows"]:
            r["delta_pct"] = None if base is None else 100 * (r["perplexity"] / base - 1)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(args.sweep, data))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
