"""The two files a quantize run writes beside its weights: ``report.json`` (the
:class:`~quantcli.run.report.QuantizeReport`, gates included) and ``quantcli.json`` (the metadata that
``load`` and ``inspect`` read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli import SCHEMA_VERSION, __version__
from quantcli.allocate.report import allocation_map
from quantcli.checkpoint.metadata import REPORT_FILE, write_metadata
from quantcli.config.gates import check_quantize, to_records
from quantcli.config.quantize import QuantizeConfig
from quantcli.measure.perplexity import EvalResult
from quantcli.quant.layers import table_names
from quantcli.quant.moe import checkpoint_renamer
from quantcli.quant.records import QuantizedModel
from quantcli.run.coverage import weight_coverage
from quantcli.run.report import QuantizeReport, size_breakdown, size_summary
from quantcli.sources.gguf_input import describe
from quantcli.sources.models import bytes_on_disk, weight_files
from quantcli.strict_json import write_json


@dataclass
class PathResult:
    """What a path (in memory or streamed) hands back for the report: the quantized model's records and the
    sizes before."""

    quantized: QuantizedModel
    tokenizer: Any
    original: dict[str, Any]
    quantized_memory: int
    skipped: dict[str, str]
    calibration: Any = None
    before: EvalResult | None = None
    after: EvalResult | None = None


def write_reports(
    staging: Path,
    output: Path,
    config: QuantizeConfig,
    method_name: str,
    device: str,
    source: str,
    timings: dict[str, float],
    result: PathResult,
) -> QuantizeReport:
    """Check the gates and write both files into ``staging`` (the weights are already there); returns the report."""
    quantized_bytes = bytes_on_disk(weight_files(str(staging)))
    model = result.quantized.model
    packed = tuple(
        name
        for name, record in result.quantized.records.items()
        if name not in result.quantized.layers and getattr(record, "raw_type", None) is not None
    )
    renamer = checkpoint_renamer(model) if hasattr(model, "config") else str
    files, parameters = weight_files(str(staging)), result.original["parameters"]
    breakdown = size_breakdown(files, result.quantized.layers, *table_names(model), parameters, renamer)
    report = QuantizeReport(
        schema_version=SCHEMA_VERSION,
        quantcli_version=__version__,
        model=config.model,
        output=str(output),
        method=method_name,
        bits=result.quantized.bits,
        format=result.quantized.format,
        device=device,
        options=result.quantized.options,
        recipe=config.to_dict(),
        calibration=None
        if result.calibration is None
        else {**vars(config.calibration), "tokens": int(result.calibration.numel())},
        size={
            **size_summary(result.original, quantized_bytes, result.quantized_memory),
            "original_format": describe(source),
            "breakdown": breakdown,
        },
        perplexity_before=result.before,
        perplexity_after=result.after,
        timings=timings,
        layers=result.quantized.layers,
        skipped=result.skipped,
        stats=result.quantized.stats,
        weights=weight_coverage(
            model, result.quantized.layers, result.skipped, config.skip_modules, config.embeddings, config.bits, packed
        ),
    )
    report.gates = to_records(check_quantize(config.gates, report.to_dict()))
    write_metadata(
        staging,
        {
            "method": method_name,
            "bits": result.quantized.bits,
            "format": result.quantized.format,
            "options": result.quantized.options,
            "source_model": config.model,
            "layers": report.to_dict()["layers"],
            "skipped": result.skipped,
            **({"allocation": allocation_map(result.quantized.stats["allocation"])} if config.allocation else {}),
            "size_breakdown": breakdown,
        },
    )
    write_json(staging / REPORT_FILE, report.to_dict())
    return report
