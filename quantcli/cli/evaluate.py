"""``quantcli eval``: perplexity, speed and memory of any checkpoint."""

from __future__ import annotations

import typer

from quantcli.cli import render
from quantcli.cli.boundary import handle_errors
from quantcli.cli.options import DEVICE_OPTION, JSON_OPTION, QUIET_OPTION
from quantcli.cli.render_measurements import render_eval
from quantcli.config.quantize import DEFAULT_EVAL_DATASET, EvalConfig
from quantcli.measure.evaluation import evaluate


@handle_errors
def eval_command(
    model: str = typer.Argument("stories260K", help="A quantcli output folder, any local checkpoint, or a Hub id."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Evaluation text. Default: the embedded TinyStories eval half."
    ),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length of each window."),
    stride: int | None = typer.Option(
        None, "--stride", help="Tokens between window starts (default: --seq-len, no overlap)."
    ),
    max_tokens: int | None = typer.Option(32768, "--max-tokens", help="Evaluate on at most this many tokens."),
    protocol: str = typer.Option(
        "stream",
        "--protocol",
        help="stream: the text tokenized once (rows joined by a blank line); documents: each row (or --doc-separator "
        "part) on its own.",
    ),
    bos: str = typer.Option(
        "auto", "--bos", help="auto: special tokens as the tokenizer adds them; start: one BOS per sequence; none."
    ),
    text_column: str | None = typer.Option(
        None, "--text-column", help="Column holding the text in .jsonl/.csv/.parquet/Hub data (default: 'text')."
    ),
    doc_separator: str | None = typer.Option(
        None,
        "--doc-separator",
        help="With --protocol documents: the string that separates documents in a plain text file.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    base: str | None = typer.Option(None, "--base", help="Base model: also report KL divergence and top-1 agreement."),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="auto (dequantized weights), int8-cpu or int4-cpu (torch weight-only integer kernels for rtn/gptq INT8 or "
        "INT4 checkpoints on CPU).",
    ),
    device: str = DEVICE_OPTION,
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Perplexity (with a 95% interval), speed and memory of any checkpoint, original or quantized."""

    config = EvalConfig(
        dataset or DEFAULT_EVAL_DATASET,
        seq_len,
        stride,
        max_tokens,
        bos,
        batch_size,
        protocol,
        text_column,
        doc_separator,
    )
    result = evaluate(model, config, base, device, render.RichProgress(enabled=not quiet), backend)
    render.print_json(result) if json_output else render_eval(result)
