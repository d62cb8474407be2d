"""Per-layer precision (issue 12) on one model, in one process: quality targets vs uniform schemes.

Texts (all WikiText-2 validation, see data/wikitext-2/README.md): the standard evaluation half
(articles 1-30, the held-out text every number below is measured on) and the calibration half
(articles 31-60) cut at article boundaries into calibration (31-45), search (46-52, the proxy check)
and verification (53-60, the tighten-and-repeat loop, windows spread over all 8 articles; a round
meets the target when the upper confidence bound of its increase does). No step of the search sees
articles 1-30. Results are saved after every step (uniform schemes first, then each target).

One preparation (Hessians, output Fisher, every candidate for every layer, the proxy check) serves
every target; each target then runs its own solve/verify rounds. Uniform schemes are the same
candidates applied to every layer (for rtn exactly what ``quantcli quantize --method rtn`` writes),
measured on the same held-out text. ``--gptq-baseline`` also times a plain GPTQ int4 run in the
same process, for the search-time ratio.

    python -m benchmarks.allocation --model smollm2 [--method rtn] [--targets 0.5 1 2 5] [--gptq-baseline]
        [--label LABEL]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import quantcli
from benchmarks.lib import setups
from benchmarks.lib.results import labelled
from quantcli.allocate.candidates import checkpoint_bytes
from quantcli.allocate.prepare import prepare
from quantcli.allocate.rounds import decide
from quantcli.allocate.search import _predicted, assemble, uniform_choices
from quantcli.config.allocation import AllocationConfig
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.errors import GateFailedError
from quantcli.measure.evaluation import measure_perplexity
from quantcli.methods import get_method
from quantcli.progress import NullProgress
from quantcli.quant.keptdtype import storage_dtype
from quantcli.quant.layers import select_modules
from quantcli.quant.records import QuantizeRequest
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import load_model, load_tokenizer

SPLIT = {"calib": (0, 15), "search": (15, 22), "verify": (22, 30)}  # article ranges within wiki.valid.calib.txt


def split_calibration(source: Path, folder: Path) -> dict[str, str]:
    """The calibration half cut before article headers (`` = Title = `` lines) into three files."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
    starts = [0] + starts[1:] if starts and starts[0] <= 1 else starts
    bounds = starts + [len(lines)]
    paths = {}
    for name, (first, last) in SPLIT.items():
        paths[name] = str(folder / f"wiki.valid.calib.{name}.txt")
        Path(paths[name]).write_text("".join(lines[bounds[first] : bounds[last]]), encoding="utf-8")
    return paths


def evaluate(model, tokenizer, evaluation, base_ppl=None):
    result = measure_perplexity(model, tokenizer, evaluation, NullProgress(), "model")
    return {
        "perplexity": result.perplexity,
        "increase_pct": None if base_ppl is None else 100 * (result.perplexity / base_ppl - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setups.add_arguments(parser)
    parser.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 1, 2, 5])
    parser.add_argument(
        "--gptq-baseline",
        action="store_true",
        help="Also time a plain GPTQ int4 run (its defaults) in the same process.",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=128, help="Calibration windows of 256 tokens (128: the methods' default)."
    )
    parser.add_argument("--search-tokens", type=int, default=2048)
    parser.add_argument("--verify-tokens", type=int, default=8192)
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="One-sided confidence of the verification's upper bound (0.5: the mean).",
    )
    parser.add_argument("--probe-layers", type=int, default=8)
    parser.add_argument("--max-rounds", type=int, default=4)
    parser.add_argument("--uniform", nargs="+", help="Candidates to measure as uniform schemes (default: all).")
    parser.add_argument("--threads", type=int, help="torch threads (1 is faster on a busy shared machine).")
    parser.add_argument("--label", help="Writes results/<model>/allocation-METHOD-LABEL.* (a run with other settings).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = setups.resolve(args)
    folder = Path(tempfile.mkdtemp(prefix="alloc-bench-"))
    texts = split_calibration(Path(setup.calib_dataset), folder) if Path(setup.calib_dataset).is_file() else None
    if texts is None:
        raise SystemExit("the calibration text must be a local file to split (use --model smollm2 or a model folder).")
    evaluation = EvalConfig(dataset=setup.eval_dataset, seq_len=setup.seq_len, max_tokens=setup.max_tokens)
    calibration = CalibrationConfig(dataset=texts["calib"], samples=args.calib_samples, seq_len=256, seed=0)
    allocation = AllocationConfig(
        target_ppl_increase=1.0,
        search_dataset=texts["search"],
        verify_dataset=texts["verify"],
        search_tokens=args.search_tokens,
        verify_tokens=args.verify_tokens,
        probe_layers=args.probe_layers,
        fisher_samples=min(32, args.calib_samples),
        confidence=args.confidence,
        max_rounds=args.max_rounds,
    )
    config = QuantizeConfig(
        model=setup.path, bits=4, method=args.method, calibration=calibration, eval=evaluation, allocation=allocation
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(setup.path)
    model = load_model(setup.path, torch.float32, "cpu")
    selection = select_modules(
        model, tables=True
    )  # the embedding (tied head) int8 g32 and bf16 scales, as `quantcli quantize` does by default
    kept = storage_dtype("auto", setup.path, model)
    scale_dtype = None if kept is None else str(kept).removeprefix("torch.")
    base = evaluate(model, tokenizer, evaluation)
    print("fp32", base, flush=True)

    start, cpu = time.perf_counter(), time.process_time()
    batch = calibration_batch(
        read_documents(texts["calib"]), tokenizer, calibration.samples, calibration.seq_len, calibration.seed
    )
    method_config = get_method(args.method).make_config(4, {})
    request = QuantizeRequest(
        setup.path,
        model,
        tokenizer,
        selection.names,
        "cpu",
        torch.float32,
        method_config,
        batch,
        tables=selection.tables,
        table_bits=8,
        scale_dtype=scale_dtype,
    )
    prepared = prepare(request, args.method, config, NullProgress())
    prepare_seconds, prepare_cpu = time.perf_counter() - start, time.process_time() - cpu
    breakdown, check = dict(prepared.seconds), prepared.check
    print("prepared", prepared.seconds, prepared.check["spearman"], prepared.check["scale"], flush=True)

    settings = {
        "model": setup.label,
        "method": args.method,
        "candidates": list(allocation.candidates),
        "texts": {
            "eval": f"{Path(setup.eval_dataset).name} ({setup.max_tokens} tokens, seq_len {setup.seq_len},"
            f" stride {setup.seq_len})",
            "calibration": f"wiki.valid.calib.txt articles 31-45 ({args.calib_samples} x 256 tokens, seed 0)",
            "search": f"articles 46-52 ({args.search_tokens} tokens, {args.probe_layers} probe layers)",
            "verify": f"articles 53-60 ({args.verify_tokens} tokens in windows of {setup.seq_len} spread over them,"
            f" {args.confidence:.0%} upper bound)",
        },
        "kept_dtype": prepared.kept_dtype,
        "embeddings": "searched: keep or int8 g32 (cost measured as KL with only it changed)",
        "scale_dtype": request.scale_dtype,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "caveat": setup.caveat,
        "note": "shared 2-core machine (other jobs running): wall-clock times are noisy;"
        " ratios are from the same process",
    }
    rows: list[dict] = []
    uniform = [
        {"scheme": "original (fp32)", "bytes": checkpoint_bytes(model, {}), "held_out": {**base, "increase_pct": 0.0}}
    ]
    result = {
        "settings": settings,
        "prepare_seconds": prepare_seconds,
        "prepare_cpu_seconds": prepare_cpu,
        "prepare_breakdown": breakdown,
        "proxy_check": check,
        "rows": rows,
        "uniform": uniform,
        "gptq_baseline": None,
    }
    out = setup.output(labelled(f"allocation-{args.method}", args.label))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every step: a slow run keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, out.with_suffix(".png"))

    for name, picks in uniform_choices(prepared.table, prepared.candidates).items():
        if name == "keep" or (args.uniform and name not in args.uniform):
            continue
        assemble(model, prepared.base, prepared.table, picks)
        uniform.append(
            {
                "scheme": f"{args.method} {name}",
                "bytes": prepared.bytes(picks),
                "predicted_kl": _predicted(prepared.table, picks),
                "held_out": evaluate(model, tokenizer, evaluation, base["perplexity"]),
            }
        )
        print("uniform", uniform[-1], flush=True)
    for target in args.targets:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            choice, rounds, chosen, _ = decide(prepared, "ppl_increase", target, allocation.max_rounds)
        except GateFailedError as error:  # no round's upper bound met the target: nothing would be written
            rows.append(
                {
                    "target_pct": target,
                    "refused": str(error),
                    "decide_seconds": time.perf_counter() - start,
                    "decide_cpu_seconds": time.process_time() - cpu,
                }
            )
            print("target", target, "refused:", error, flush=True)
            save()
            continue
        decide_seconds, decide_cpu = time.perf_counter() - start, time.process_time() - cpu
        held_out = evaluate(model, tokenizer, evaluation, base["perplexity"])
        counts: dict[str, int] = {}
        for name, index in choice.items():
            label = prepared.table[name][index].names[0]
            counts[label] = counts.get(label, 0) + 1
        rival = [u for u in uniform if u["held_out"]["increase_pct"] <= held_out["increase_pct"]]
        total = prepared.bytes(choice)
        rows.append(
            {
                "target_pct": target,
                "bytes": total,
                "predicted_kl": _predicted(prepared.table, choice),
                "held_out": held_out,
                "held_out_over_target": held_out["increase_pct"] / target,
                "verify": rounds[chosen]["measured"],
                "rounds": rounds,
                "chosen_round": chosen + 1,
                "choices": counts,
                "decide_seconds": decide_seconds,
                "decide_cpu_seconds": decide_cpu,
                "best_uniform_as_good": min(rival, key=lambda u: u["bytes"])["scheme"] if rival else None,
                "bytes_saved_vs_best_uniform_as_good": min(u["bytes"] for u in rival) - total if rival else None,
                "pareto": all(u["bytes"] > total for u in rival),
                "layers": {name: prepared.table[name][index].names[0] for name, index in choice.items()},
            }
        )
        print("target", target, total, held_out, counts, flush=True)
        save()
    save()
    if args.gptq_baseline:
        del prepared
        start, cpu = time.perf_counter(), time.process_time()
        report = quantcli.quantize(
            QuantizeConfig(
                model=setup.path,
                bits=4,
                method="gptq",
                method_options={},
                calibration=calibration,
                eval=None,
                output=folder / "gptq",
            )
        ).to_dict()
        result["gptq_baseline"] = {
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
            "timings": report["timings"],
        }
        save()

    print(out.with_suffix(".md").read_text())


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Per-layer allocation ({s['method']}, candidates {', '.join(s['candidates'])}) on {s['model']}. Held-out:"
        f" {s['texts']['eval']};"
        f" calibration {s['texts']['calibration']}; search {s['texts']['search']}; verification"
        f" {s['texts']['verify']}; embeddings {s['embeddings']}, kept tensors {s['kept_dtype']}, scales"
        f" {s['scale_dtype']}; {s['date']}. {s['note']}.",
        "",
    ]
    lines += [
        "| target Δppl | size on disk | held-out Δppl | / target | verify Δppl (upper bound) | rounds | layers |"
        " smallest uniform as good | bytes saved | Pareto |",
        "|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in result["rows"]:
        if "refused" in r:
            lines.append(f"| +{r['target_pct']:g}% | refused (exit 4, nothing written): {r['refused']} |||||||||")
            continue
        layers = ", ".join(f"{n} {c}" for c, n in sorted(r["choices"].items(), key=lambda item: -item[1]))
        saved = (
            ""
            if r["bytes_saved_vs_best_uniform_as_good"] is None
            else f"{r['bytes_saved_vs_best_uniform_as_good'] / 1e6:+.2f} MB"
        )
        lines.append(
            f"| +{r['target_pct']:g}% | {r['bytes'] / 1e6:.2f} MB | {r['held_out']['increase_pct']:+.2f}% |"
            f" {r['held_out_over_target']:.2f} |"
            f" {r['verify']['ppl_increase']:+.2f}% ({r['verify']['ppl_increase_upper']:+.2f}%) | {len(r['rounds'])} |"
            f" {layers} | {r['best_uniform_as_good'] or '-'} | {saved} | {'yes' if r['pareto'] else 'NO'} |"
        )
    lines += ["", "| uniform scheme | size on disk | held-out perplexity | held-out Δppl |", "|---|---:|---:|---:|"]
    for u in result["uniform"]:
        lines.append(
            f"| {u['scheme']} | {u['bytes'] / 1e6:.2f} MB | {u['held_out']['perplexity']:.4f} |"
            f" {u['held_out']['increase_pct']:+.2f}% |"
        )
    check = result["proxy_check"]
    lines += [
        "",
        f"Proxy check (single-layer KL on the search text, {len(check['pairs'])} layer/candidate pairs): Spearman"
        f" {check['spearman']:.3f}, fitted scale {check['scale']:.3g}.",
    ]
    lines += [
        f"Search preparation: {result['prepare_seconds']:.0f} s"
        f" ({', '.join(f'{k} {v:.0f} s' for k, v in result['prepare_breakdown'].items())}); per target: "
        + ", ".join(f"{r['decide_seconds']:.0f} s" for r in result["rows"])
        + "."
    ]
    if result["gptq_baseline"]:
        g = result["gptq_baseline"]["seconds"]
        per_target = result["prepare_seconds"] + max(
            r["decide_seconds"] for r in result["rows"]
        )  # refused targets included
        lines.append(
            f"Plain GPTQ int4 at its defaults (no eval) in the same process: {g:.0f} s; one target's search"
            f" (preparation + slowest solve/verify): {per_target:.0f} s = {per_target / g:.2f}x."
        )
        if "cpu_seconds" in result["gptq_baseline"]:  # process CPU time: what other jobs on the machine do not inflate
            c = result["gptq_baseline"]["cpu_seconds"]
            search = result["prepare_cpu_seconds"] + max(r["decide_cpu_seconds"] for r in result["rows"])
            lines.append(
                f"In process CPU time: plain GPTQ {c:.0f} s, one target's search {search:.0f} s = {search / c:.2f}x."
            )
    if result["settings"]["caveat"]:
        lines += ["", f"Caveat: {result['settings']['caveat']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for u in result["uniform"]:
        axes.scatter(u["bytes"] / 1e6, max(u["held_out"]["increase_pct"], 1e-3), marker="s", color="tab:blue")
        axes.annotate(
            u["scheme"],
            (u["bytes"] / 1e6, max(u["held_out"]["increase_pct"], 1e-3)),
            textcoords="offset points",
            xytext=(5, 3),
            fontsize=8,
        )
    for r in (r for r in result["rows"] if "refused" not in r):
        axes.scatter(r["bytes"] / 1e6, max(r["held_out"]["increase_pct"], 1e-3), marker="*", s=140, color="tab:red")
        axes.annotate(
            f"target +{r['target_pct']:g}%",
            (r["bytes"] / 1e6, max(r["held_out"]["increase_pct"], 1e-3)),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=8,
        )
    axes.scatter([], [], marker="s", color="tab:blue", label="uniform")
    axes.scatter([], [], marker="*", s=140, color="tab:red", label="allocated")
    axes.set_yscale("log")
    axes.set(
        xlabel="size on disk (MB)",
        ylabel="held-out perplexity increase (%)",
        title=f"{result['settings']['model']}: allocation vs uniform ({result['settings']['method']})",
    )
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
