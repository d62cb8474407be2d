"""Which symmetric integer grid to default to: round-to-nearest on SmolLM2 with each observer and group size.

    PYTHONPATH=. python benchmarks/smollm2_grid.py   # needs `make smollm2`; writes results/smollm2-grid.{json,md}

One process, the model loaded once (``--rows`` picks rows; each is saved as it finishes); every row restores the fp32 weights, rounds every Linear layer
(the group rule of :func:`quantcli.quant.intgrid.group_size_for`) and the tied embedding/head (8-bit per
row, the default) to nearest, and scores the standard WikiText windows. Observers: ``minmax``
(absmax/7.5 at 4 bits), ``signed`` (Q4_0's rule: the largest-magnitude weight on code -8, signed
scale) and ``mse`` (clipped range by an error search). GPTQ rows come from ``benchmarks/wholemodel.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import setups
import torch

from quantcli.quant import ops
from quantcli.config.quantize import EvalConfig
from quantcli.quant.intgrid import plan_layouts
from quantcli.sources.models import load_model, load_tokenizer
from quantcli.quant.layers import select_modules, set_weight_matrix, weight_matrix
from quantcli.measure.evaluation import measure_perplexity
from quantcli.progress import NullProgress

ROWS = [f"{observer}-g{group}" for group in (32, 64) for observer in ("minmax", "signed", "mse")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS, help="observer-gGROUP rows to run (default: all).")
    parser.set_defaults(model="smollm2")
    args = parser.parse_args()
    setup = setups.resolve(args)
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    tokenizer = load_tokenizer(setup.path)
    model = load_model(setup.path, torch.float32, "cpu")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules = dict(model.named_modules())
    embedding = next(name for name, module in modules.items() if module is model.get_input_embeddings())
    out = setup.output("grid").with_suffix(".json")
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    data["settings"] = {"eval": vars(evaluation), "model": setup.label, "caveat": setup.caveat, "embedding": "int8 per row (tied head)"}
    for row_name in args.rows:
        observer, group = row_name.split("-g")[0], int(row_name.split("-g")[1])
        bits = 4
        model.load_state_dict(original)
        start = time.perf_counter()
        names = select_modules(model).names
        for name, layout in plan_layouts(model, names, bits, True, group, observer).items():
            matrix = weight_matrix(modules[name])
            set_weight_matrix(modules[name], ops.fake_quantize(matrix, bits, True, layout.group_size, observer))
        table = modules[embedding].weight
        table.data.copy_(ops.fake_quantize(table.data, 8, True, None))
        result = measure_perplexity(model, tokenizer, evaluation, NullProgress(), "rtn")
        row = {"row": row_name, "method": "rtn", "bits": bits, "group_size": group, "observer": observer, "embedding": "int8 per row",
               "perplexity": result.perplexity, "seconds": time.perf_counter() - start}
        data["rows"] = [r for r in data["rows"] if r.get("row") != row_name] + [row]
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
