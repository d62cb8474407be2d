"""Which int8 grid to default to: round-to-nearest int8 on SmolLM2 with each observer and scale dtype.

    PYTHONPATH=. python benchmarks/int8_grid.py   # needs `make smollm2`; writes results/smollm2-int8-grid.{json,md}

One process, the model loaded once. Each row restores the fp32 weights, rounds every Linear layer
to int8 per channel and the tied embedding/head to int8 in groups of 64 with the row's observer,
its scales rounded to the row's dtype before the integers are chosen (as the pipeline does), rounds
the kept tensors to bfloat16, and scores the standard WikiText windows. In memory: no checkpoint is
written (the pipeline's files reload to the same values, tests/test_wholemodel.py).
"""

from __future__ import annotations

import argparse
import json
import time

import setups
import torch

from quantcli.quant import ops
from quantcli.config.quantize import EvalConfig
from quantcli.measure.evaluation import measure_perplexity
from quantcli.quant.keptdtype import round_kept
from quantcli.quant.layers import select_modules, set_weight_matrix, weight_matrix
from quantcli.sources.models import load_model, load_tokenizer
from quantcli.progress import NullProgress

ROWS = ["minmax-float32", "minmax-float16", "minmax-bfloat16", "signed-float32", "signed-bfloat16"]
EMBEDDING_GROUP = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="observer-dtype rows to run (default: all).")
    parser.set_defaults(model="smollm2")
    args = parser.parse_args()
    setup = setups.resolve(args)
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    tokenizer, model = load_tokenizer(setup.path), load_model(setup.path, torch.float32, "cpu")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules = dict(model.named_modules())
    selection = select_modules(model, tables=True)
    layers = selection.names + selection.tables
    out = setup.output("int8-grid").with_suffix(".json")
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    data["settings"] = {"eval": vars(evaluation), "model": setup.label, "caveat": setup.caveat,
                        "layers": "Linear per channel, embedding/head in groups of 64, kept tensors bfloat16"}
    for row_name in args.rows:
        observer, dtype = row_name.split("-")
        model.load_state_dict(original)
        start = time.perf_counter()
        for name in layers:
            matrix, group = weight_matrix(modules[name]), EMBEDDING_GROUP if name in selection.tables else None
            scale, zero_point = ops.compute_qparams(matrix, 8, True, group, observer, getattr(torch, dtype))
            set_weight_matrix(modules[name], ops.dequantize(ops.quantize(matrix, scale, zero_point, 8, group), scale, zero_point, group))
        round_kept(model, set(layers), torch.bfloat16)
        result = measure_perplexity(model, tokenizer, evaluation, NullProgress(), "rtn")
        row = {"row": row_name, "observer": observer, "scale_dtype": dtype, "perplexity": result.perplexity, "seconds": time.perf_counter() - start}
        data["rows"] = [r for r in data["rows"] if r.get("row") != row_name] + [row]
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    lines = ["| observer | scales | perplexity |", "|---|---|--:|"] + [f"| {r['observer']} | {r['scale_dtype']} | {r['perplexity']:.4f} |" for r in data["rows"]]
    out.with_suffix(".md").write_text(f"# int8 grids on {setup.label}\n\n{json.dumps(data['settings'])}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
