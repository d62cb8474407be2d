"""How the int8 grid of SmolLM2's tied embedding/head alone moves perplexity: per row, groups of 64, 32.

    PYTHONPATH=. python benchmarks/embedding_grid.py   # needs `make smollm2`; writes results/smollm2-embedding-grid.json

Only the embedding (tied to the head) is rounded; every other tensor stays fp32. Standard windows:
WikiText-2 validation articles 1-30, 16,384 tokens, windows of 512 (the stream protocol).
"""

from __future__ import annotations

import json
from pathlib import Path

import setups
import torch

from quantcli.quant import ops
from quantcli.config.quantize import EvalConfig
from quantcli.sources.models import load_model, load_tokenizer
from quantcli.measure.evaluation import measure_perplexity
from quantcli.progress import NullProgress

DATA = Path(__file__).parent / "data" / "wikitext-2" / "wiki.valid.eval.txt"


def main() -> None:
    path = str(setups.model_folder("smollm2"))
    tokenizer, model = load_tokenizer(path), load_model(path, torch.float32, "cpu")
    evaluation = EvalConfig(dataset=str(DATA), seq_len=512, max_tokens=16384)
    weight = model.get_input_embeddings().weight
    original = weight.data.clone()
    rows = [{"grid": "fp32", "perplexity": measure_perplexity(model, tokenizer, evaluation, NullProgress(), path).perplexity}]
    for group in (None, 64, 32):
        scale, zero_point = ops.compute_qparams(original, 8, True, group, "minmax")
        weight.data = ops.dequantize(ops.quantize(original, scale, zero_point, 8, group), scale, zero_point, group)
        perplexity = measure_perplexity(model, tokenizer, evaluation, NullProgress(), path).perplexity
        rows.append({"grid": "int8 per row" if group is None else f"int8 groups of {group}", "perplexity": perplexity,
                     "delta_pct": 100 * (perplexity / rows[0]["perplexity"] - 1), "scale_bytes": original.shape[0] * (1 if group is None else original.shape[1] // group) * 4})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "results" / "smollm2-embedding-grid.json"
    out.write_text(json.dumps({"settings": {"eval": vars(evaluation), "model": path}, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
