"""RTN vs GPTQ int4 at -g 128 on SmolLM2, one process, one calibration seed: the issue-9 quality check.

    PYTHONPATH=. python benchmarks/smollm2_gptq_check.py   # needs `make smollm2`; writes results/smollm2-gptq-g128.json

benchmarks/methods.py --model smollm2 runs the same rows over several seeds; this is the quick check.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.lib import setups

import quantcli
from quantcli.config import CalibrationConfig, EvalConfig, QuantizeConfig

DATA = Path(__file__).parent / "data" / "wikitext-2"


def main() -> None:
    model = setups.model_folder("smollm2")
    evaluation = EvalConfig(dataset=str(DATA / "wiki.valid.eval.txt"), seq_len=512, max_tokens=16384)
    calibration = CalibrationConfig(dataset=str(DATA / "wiki.valid.calib.txt"), samples=128, seq_len=256, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("rtn", "gptq"):
            start = time.perf_counter()
            report = quantcli.quantize(QuantizeConfig(
                model=str(model), bits=4, method=method, method_options={"group_size": 128},
                calibration=calibration, eval=evaluation, output=Path(tmp) / method,
            )).to_dict()
            rows[method] = {
                "before": report["perplexity_before"]["perplexity"], "after": report["perplexity_after"]["perplexity"],
                "delta_pct": report["perplexity_delta"]["percent"], "seconds": time.perf_counter() - start,
                "timings": report["timings"], "grouping": report["grouping"], "disk_bytes": report["size"]["quantized_disk_bytes"],
                "settings": report["perplexity_after"]["settings"], "calibration": report["calibration"],
            }
            print(method, json.dumps(rows[method]), flush=True)
    rows["gptq_over_rtn"] = rows["gptq"]["delta_pct"] / rows["rtn"]["delta_pct"]
    out = Path(__file__).parent / "results" / "smollm2-gptq-g128.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
