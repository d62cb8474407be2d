"""One table across quantized checkpoints: method, bits, size, bits/weight, perplexity, change vs the
base model, KL / top-1 agreement; read from each folder's report.json, evaluated where missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli import SCHEMA_VERSION
from quantcli.checkpoint.conditions import check_report_types
from quantcli.checkpoint.load import inspect, load
from quantcli.checkpoint.metadata import REPORT_FILE
from quantcli.checkpoint.paths import check_writable
from quantcli.config.quantize import EvalConfig
from quantcli.errors import CheckpointError, InputError, OutputWriteError, option
from quantcli.limits import MAX_METADATA_BYTES, read_bounded
from quantcli.measure.evaluation import evaluate, measure_perplexity
from quantcli.measure.plot import layer_errors, plot_compare
from quantcli.progress import NullProgress, Progress


def _report(folder: Path) -> dict[str, Any] | None:
    path = folder / REPORT_FILE
    if not path.exists():
        return None
    try:
        report = json.loads(read_bounded(path, "report", MAX_METADATA_BYTES).decode("utf-8"))
    except InputError as error:
        raise CheckpointError(str(error)) from None
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}). Re-run quantcli quantize.") from None

    check_report_types(report, path)
    return report


def _row(folder: Path, progress: Progress, config: EvalConfig, base: str | None, base_loaded: Any) -> dict[str, Any]:
    info = inspect(folder)
    report = _report(folder) or {}
    parameters = (report.get("size") or {}).get("parameters")
    row = {
        "checkpoint": str(folder),
        "method": info["method"],
        "bits": info["bits"],
        "disk_bytes": info["disk_bytes"],
        "bits_per_weight": 8 * info["disk_bytes"] / parameters if parameters else None,
        "source_model": info.get("source_model"),
        "perplexity": (report.get("perplexity_after") or {}).get("perplexity"),
        "settings": (report.get("perplexity_after") or {}).get("settings"),
        "base_perplexity": (report.get("perplexity_before") or {}).get("perplexity"),
        "kl_divergence": None,
        "top1_agreement": None,
        "evaluated": False,
    }
    if base is not None or row["perplexity"] is None:
        result = evaluate(
            str(folder),
            config,
            base,
            "auto",
            progress,
            base_model=base_loaded and base_loaded[0],
            base_tokenizer=base_loaded and base_loaded[1],
        )
        row.update(
            perplexity=result["perplexity"],
            settings=result["settings"],
            kl_divergence=result["kl_divergence"],
            top1_agreement=result["top1_agreement"],
            evaluated=True,
        )
    return row


def compare(
    dirs: list[Path],
    base: str | None = None,
    config: EvalConfig | None = None,
    plot: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Rows for ``dirs``; with ``base`` (loaded once), every checkpoint is re-evaluated against it on
    ``config`` (so perplexity, its change and KL share one setting); ``plot`` also draws the trade-off PNG."""

    if not dirs:
        raise InputError("pass at least one quantcli output folder to compare.")
    progress = progress or NullProgress()
    config = config or EvalConfig()
    if plot is not None:  # before any evaluation: a bad --plot path must not cost the whole run
        if Path(plot).suffix.lower() != ".png":
            raise InputError(f"{option('plot', plot)}: write a .png file.")
        check_writable(Path(plot), "plot")
    loaded = None
    if base is not None:
        with progress.task("load base", total=None):
            loaded = load(base, "auto")
    rows = [_row(Path(folder), progress, config, base, loaded) for folder in dirs]
    if loaded is not None:
        base_ppl = measure_perplexity(loaded[0], loaded[1], config, progress, "base").perplexity
        for row in rows:
            row["base_perplexity"] = base_ppl
    for row in rows:
        before, after = row["base_perplexity"], row["perplexity"]
        row["perplexity_delta_percent"] = 100 * (after - before) / before if before and after else None
    result = {
        "schema_version": SCHEMA_VERSION,
        "base": base,
        "settings": vars(config) if base else None,
        "rows": rows,
        "plot": None,
        "settings_note": None if base else settings_note(rows),
    }
    if plot is not None:
        reference = base or rows[0]["source_model"]
        if reference is None:
            raise InputError(f"the per-layer error plot needs the original model. Pass {option('base', 'MODEL')}.")
        errors = {row["checkpoint"]: layer_errors(row["checkpoint"], reference) for row in rows}
        result["layer_errors"] = errors
        try:
            result["plot"] = str(plot_compare(rows, errors, Path(plot)))
        except OSError as error:
            raise OutputWriteError(
                f"cannot write {option('plot', plot)}: {error.strerror or error}. Choose a writable {option('plot')} "
                "path."
            ) from None
    return result


def markdown(result: dict[str, Any]) -> str:
    """A GitHub Markdown table of ``compare``'s rows, for PR comments."""
    header = "| checkpoint | method | bits | size on disk (MB) | bits/weight | perplexity | Δ vs base | KL | top-1 |"
    lines = [header, "|---|---|--:|--:|--:|--:|--:|--:|--:|"]

    def number(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    for row in result["rows"]:
        delta_unit = "%" if row["perplexity_delta_percent"] is not None else ""
        top1_unit = "%" if row["top1_agreement"] is not None else ""
        lines.append(
            f"| `{Path(row['checkpoint']).name}` | {row['method']} | {row['bits']} | {row['disk_bytes'] / 1e6:.3f} |"
            f" {number(row['bits_per_weight'], '.2f')} | {number(row['perplexity'], '.4f')} |"
            f" {number(row['perplexity_delta_percent'], '+.2f')}{delta_unit} |"
            f" {number(row['kl_divergence'], '.5f')} | "
            f"{number(row['top1_agreement'] and 100 * row['top1_agreement'], '.1f')}{top1_unit} |"
        )
    if result["base"]:
        lines.append(
            f"\nBase `{result['base']}` perplexity {number(result['rows'][0]['base_perplexity'], '.4f')} on "
            f"{result['settings']['dataset']}, {result['settings']['max_tokens']} tokens, context "
            f"{result['settings']['seq_len']}."
        )
    else:
        lines.append("\n" + result["settings_note"])
    return "\n".join(lines)


DIFFERENT_SETTINGS = (  # result data (compare's --json and --markdown), so it names the flag itself
    "Warning: these perplexities come from each checkpoint's report.json with different settings;"
    " pass --base MODEL to evaluate all alike."
)


def settings_note(rows: list[dict[str, Any]]) -> str:
    """How the rows' perplexities were measured; a warning when they were not measured alike."""
    settings = [row.get("settings") for row in rows]
    first = settings[0] or {}
    described = (
        f"{first.get('dataset')}, {first.get('tokens')} tokens, context {first.get('seq_len')},"
        f" stride {first.get('stride')}, protocol {first.get('protocol')}, BOS {first.get('bos')}"
    )
    if any(s != settings[0] for s in settings[1:]):
        return DIFFERENT_SETTINGS
    return f"Perplexities from each checkpoint's report.json, all measured on {described}."
