"""``quantcli eval`` of a llama.cpp-written GGUF against llama.cpp's own perplexity of it (issue 13).

    QUANTCLI_LLAMACPP=/path/.llamacpp python -m benchmarks.gguf_eval_check [--model smollm2] [--type Q4_0]

llama.cpp converts the model to an F32 GGUF and quantizes it (``llama_model_quantize``, default
params); llama.cpp scores the file on benchmarks/llamacpp.py's token ids and windows with its default
F16 KV cache and with an F32 one (``type_k``/``type_v`` 0), and ``quantcli eval FILE.gguf``
(transformers' GGUF loader, dequantized, fp32) scores it on the same text. The F32 cache removes one
of llama.cpp's own roundings; the 8-bit rounding of activations in its block-quantized matmuls
remains. Writes benchmarks/results/<model>/gguf-eval-check.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.lib.llamacpp_tables import quantcli_eval
from benchmarks.lib.results import result_stem
from tests.support.gguf_harness import (
    MODELS,
    convert,
    eval_ids,
    llamacpp_logits,
    model_folder,
    perplexity,
    quantize,
    window_nlls,
)


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--type", default="Q4_0")
    args = parser.parse_args()
    spec, folder = MODELS[args.model], model_folder(args.model)
    ids = eval_ids(AutoTokenizer.from_pretrained(folder), spec["dataset"], spec["max_tokens"])
    result = {
        "model": args.model,
        "type": args.type,
        "tokens": len(ids),
        "seq_len": spec["seq_len"],
        "dataset": spec["dataset"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        f32, file = Path(tmp) / "F32.gguf", Path(tmp) / f"{args.type}.gguf"
        convert(folder, f32, "f32", spec.get("tokenizer_model"))
        quantize(f32, file, args.type, 2)
        for label, options in (("llamacpp_f16_kv", {}), ("llamacpp_f32_kv", {"type_k": 0, "type_v": 0})):
            result[label] = perplexity(
                window_nlls(llamacpp_logits(file, spec["seq_len"], 2, **options), ids, spec["seq_len"])
            )
        result["quantcli"] = quantcli_eval(file, spec, result["llamacpp_f32_kv"])["quantcli"]
    for label in ("llamacpp_f16_kv", "llamacpp_f32_kv"):
        result[f"diff_pct_vs_{label}"] = 100 * (result["quantcli"] / result[label] - 1)
    out = result_stem(args.model, "gguf-eval-check").with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
