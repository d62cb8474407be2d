"""The ``quantcli`` command: each command parses options, builds a config, calls one library
function and renders the result. Heavy imports happen inside commands so ``--help`` stays fast."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import click
import typer

from quantcli import __version__

app = typer.Typer(
    help="Quantize Hugging Face causal LMs to INT8/INT4 and measure size, perplexity and speed.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout (schema_version inside).")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bars on stderr.")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one stderr line and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from quantcli.errors import QuantCliError

        debug = os.environ.get("QUANTCLI_DEBUG", "") not in ("", "0")
        from quantcli.console import tolerate_terminal_encoding

        tolerate_terminal_encoding()
        if not debug:  # quantcli draws its own progress; keep the libraries' bars and chatter off stderr
            os.environ.setdefault("TQDM_DISABLE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from quantcli.signals import describe, exit_code, terminate_as_interrupt

        try:
            with terminate_as_interrupt():
                return command(*args, **kwargs)
        except (typer.Exit, click.ClickException):  # click's own usage errors keep click's standard format
            raise
        except QuantCliError as error:
            if debug:
                raise
            from quantcli.cliflags import cli_text
            from quantcli.limits import clip_message

            print(f"error: {clip_message(cli_text(error, wrapper))}", file=sys.stderr)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as error:  # Ctrl-C, SIGTERM, SIGHUP
            print(f"interrupted{describe(error)}: nothing was written.", file=sys.stderr)
            raise typer.Exit(exit_code(error)) from None
        except Exception as error:  # noqa: BLE001 - the boundary where bugs become one line
            if debug:
                raise
            from quantcli.limits import clip_message

            print(f"internal error: {type(error).__name__}: {clip_message(str(error), 400)}. Set QUANTCLI_DEBUG=1 for the traceback and report it.", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """Quantize Hugging Face causal LMs to INT8/INT4 and measure size, perplexity and speed."""


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@app.command()
@handle_errors
def quantize(
    model: Optional[str] = typer.Argument(None, help="Hub id, local folder, or 'stories260K' (the embedded default).", show_default="stories260K"),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="8 or 4 (3 with rtn/gptq; 16 casts to fp16/bf16)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="rtn, gptq, gptq-nf4, bnb-int8, bnb-nf4, bnb-fp4, cast. Default: bitsandbytes on CUDA, rtn on CPU."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder. Default: MODEL-METHOD-wBITS."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe; options given here override it."),
    output_format: Optional[str] = typer.Option(None, "--format", help="gguf: one llama.cpp file (with --gguf-type; rtn or gptq). Default: the method's own format."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="With --format gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K or the mix Q4_K_M (sets --bits)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Weights per scale (rtn/gptq; -1 per channel)."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="Symmetric or zero-point integers (rtn/gptq)."),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="Quantize the 4-bit scales too (bnb-nf4/fp4)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing activation energy."),
    clip_search: Optional[bool] = typer.Option(None, "--clip-search/--no-clip-search", help="GPTQ: choose each row's range by its output error (default on)."),
    observer: Optional[str] = typer.Option(None, "--observer", help="How rtn/gptq pick scales: signed (Q4_0: largest weight on the lowest code; default below 8 bits, symmetric), minmax (absmax; default at 8 bits and asymmetric) or mse (clipping search)."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help=(
        "rtn/gptq: the input embedding and output head (one tensor when tied): keep (16-bit, default: vLLM serves"
        " it), 8 (int8 in groups of 32) or 4 (the layers' grid); vLLM cannot serve 8 or 4 (--format gguf quantizes"
        " them for llama.cpp)."
    )),
    activations: Optional[str] = typer.Option(None, "--activations", help=(
        "int8: W8A8 for vLLM's int8 kernels (rtn/gptq --bits 8, per channel): each layer's inputs quantized per token"
        " at run time, in quantcli's eval too."
    )),
    smoothing: Optional[float] = typer.Option(None, "--smoothing", help=(
        "With --activations int8: SmoothQuant's strength alpha (0-1; 0.8 was best on SmolLM2), calibrated on"
        " --calib-dataset: activation outliers moved into the weights."
    )),
    keep_dtype: Optional[str] = typer.Option(None, "--keep-dtype", help="rtn/gptq: dtype of tensors left unquantized (norms, biases, a kept head): auto (16-bit; default) or float32, bfloat16, float16."),
    skip_modules: Optional[List[str]] = typer.Option(None, "--skip-modules", help="Glob of layer names to keep in full precision (repeatable)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="A method option not worth a flag, KEY=VALUE (repeatable), e.g. -O damp=0.05; checked by the method."),
    calib_dataset: Optional[str] = typer.Option(None, "--calib-dataset", help="Calibration text: a local text file, .jsonl/.csv/.parquet, or a Hub spec path:config:split."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration windows."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration and evaluation window."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for calibration sampling."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding the text in .jsonl/.csv/.parquet/Hub data (default: 'text')."),
    eval_dataset: Optional[str] = typer.Option(None, "--eval-dataset", help="Evaluation text (kept apart from calibration)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Evaluate on at most this many tokens."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip perplexity before/after."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Spread the model over all GPUs (and CPU) with accelerate: auto, balanced, sequential."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repo's own Python code (off by default)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Split the weights into shards of at most this size (e.g. 2GB, 500MB) plus an index."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Stream the weights from disk one decoder block at a time (rtn, gptq, gptq-nf4), for models larger than memory (no perplexity)."),
    sequential: bool = typer.Option(False, "--sequential", hidden=True, help="Deprecated name of --low-memory."),
    resume: bool = typer.Option(False, "--resume", help="With --low-memory: continue an interrupted run after its last finished block."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="CI gate, in percent: exit 4 if perplexity rises more (2 = 2%)."),
    max_size: Optional[float] = typer.Option(None, "--max-size", help="CI gate: exit 4 if the quantized weights exceed this many MB (10^6 bytes) on disk."),
    target_ppl_increase: Optional[float] = typer.Option(None, "--target-ppl-increase", help="Per-layer precision: the smallest checkpoint whose perplexity rises at most this many percent (rtn/gptq)."),
    target_kl: Optional[float] = typer.Option(None, "--target-kl", help="Per-layer precision: the smallest checkpoint within this mean KL vs the original (nats/token)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Per-layer precision: the best quality within this checkpoint size on disk (80MB, 1.5GB)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Per-layer precision: the best quality within this many bits per weight on disk."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="With --target-*: comma-separated choices per layer (default keep,int8,int4-g128,int4-g64,int4-g32,int3-g32)."),
    search_dataset: Optional[str] = typer.Option(None, "--search-dataset", help="With --target-*: text for the proxy check (default: the calibration text)."),
    verify_dataset: Optional[str] = typer.Option(None, "--verify-dataset", help="With --target-*: held-out text each allocation is verified on (default: the eval text)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --target-*: draw the searched size/quality curve and the uniform schemes to this PNG."),
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Quantize MODEL, write the checkpoint, and report size and perplexity before and after."""
    from quantcli import console
    from quantcli.recipes import merge_quantize_config
    from quantcli.gates import enforce
    from quantcli.pipeline import quantize as run_quantize

    if sequential:
        print("warning: --sequential is deprecated; it is now called --low-memory.", file=sys.stderr)
        low_memory = True
    switches = {"force": force, "trust_remote_code": trust_remote_code, "low_memory": low_memory, "resume": resume}
    skip = [glob for value in skip_modules for glob in value.split(",") if glob] if skip_modules else None
    config = merge_quantize_config(
        config,
        top={**_given(model=model, bits=bits, method=method, output=output, device=device, device_map=device_map, dtype=dtype,
                      max_shard_size=max_shard_size, skip_modules=skip, embeddings=embeddings, keep_dtype=keep_dtype, format=output_format, gguf_type=gguf_type), **{key: True for key, value in switches.items() if value}},
        method_options=_given(group_size=group_size, symmetric=symmetric, double_quant=double_quant, act_order=act_order,
                              clip_search=clip_search, observer=observer, activations=activations,
                              smoothing=smoothing),
        calibration=_given(dataset=calib_dataset, samples=calib_samples, seq_len=seq_len, seed=seed, text_column=text_column),
        evaluation=None if no_eval else _given(dataset=eval_dataset, seq_len=seq_len, max_tokens=max_tokens, text_column=text_column),
        gates=_given(max_ppl_increase=max_ppl_increase, max_size=max_size),
        options=option or [],
        allocation=_given(target_ppl_increase=target_ppl_increase, target_kl=target_kl, target_size=target_size, target_bpw=target_bpw,
                          candidates=candidates, search_dataset=search_dataset, verify_dataset=verify_dataset, plot=None if plot is None else str(plot)),
    )
    report = run_quantize(config, console.RichProgress(enabled=not quiet))
    data = report.to_dict()
    console.print_json(data) if json_output else console.render_quantize(data)
    enforce(data["gates"])


@app.command("eval")
@handle_errors
def eval_command(
    model: str = typer.Argument("stories260K", help="A quantcli output folder, any local checkpoint, or a Hub id."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Evaluation text. Default: the embedded TinyStories eval half."),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length of each window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window starts (default: --seq-len, no overlap)."),
    max_tokens: Optional[int] = typer.Option(32768, "--max-tokens", help="Evaluate on at most this many tokens."),
    protocol: str = typer.Option("stream", "--protocol", help="stream: the text tokenized once (rows joined by a blank line); documents: each row (or --doc-separator part) on its own."),
    bos: str = typer.Option("auto", "--bos", help="auto: special tokens as the tokenizer adds them; start: one BOS per sequence; none."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding the text in .jsonl/.csv/.parquet/Hub data (default: 'text')."),
    doc_separator: Optional[str] = typer.Option(None, "--doc-separator", help="With --protocol documents: the string that separates documents in a plain text file."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: also report KL divergence and top-1 agreement."),
    backend: str = typer.Option("auto", "--backend", help="auto (dequantized weights), int8-cpu or int4-cpu (torch weight-only integer kernels for rtn/gptq INT8 or INT4 checkpoints on CPU)."),
    device: str = DEVICE_OPTION,
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Perplexity (with a 95% interval), speed and memory of any checkpoint, original or quantized."""
    from quantcli import console
    from quantcli.config import DEFAULT_EVAL_DATASET, EvalConfig
    from quantcli.evaluation import evaluate

    config = EvalConfig(
        dataset or DEFAULT_EVAL_DATASET, seq_len, stride, max_tokens, bos, batch_size, protocol, text_column, doc_separator
    )
    result = evaluate(model, config, base, device, console.RichProgress(enabled=not quiet), backend)
    console.print_json(result) if json_output else console.render_eval(result)


@app.command()
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A quantcli output folder."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Method, bits, per-layer map and size of a quantized checkpoint."""
    from quantcli import console
    from quantcli.checkpoint import inspect as inspect_checkpoint

    info = inspect_checkpoint(path)
    console.print_json(info) if json_output else console.render_inspect(info)


@app.command()
@handle_errors
def compare(
    dirs: List[Path] = typer.Argument(..., help="quantcli output folders."),
    base: Optional[str] = typer.Option(None, "--base", help="Re-evaluate every folder against this model (perplexity change, KL, top-1) on one setting."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens evaluated per model when evaluating."),
    seq_len: int = typer.Option(256, "--seq-len", help="Context length when evaluating."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a GitHub Markdown table (for PR comments)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw size vs perplexity and per-layer error to this PNG (needs matplotlib)."),
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """One table across quantized checkpoints: size, bits/weight, perplexity, change vs base, KL."""
    from quantcli import console
    from quantcli.compare import compare as run_compare
    from quantcli.compare import markdown as to_markdown
    from quantcli.config import DEFAULT_EVAL_DATASET, EvalConfig

    config = EvalConfig(DEFAULT_EVAL_DATASET, seq_len, None, max_tokens)
    result = run_compare(list(dirs), base, config, plot, console.RichProgress(enabled=not quiet))
    if json_output:
        console.print_json(result)
    elif markdown:
        print(to_markdown(result))
    else:
        console.render_compare(result)


BACKEND_OPTION = typer.Option("auto", "--backend", help="auto (dequantized weights), int8-cpu or int4-cpu (torch weight-only integer kernels for rtn/gptq INT8 or INT4 checkpoints on CPU).")


@app.command()
@handle_errors
def bench(
    model: str = typer.Argument("stories260K", help="A quantcli output folder, any local checkpoint, or a Hub id."),
    base: Optional[str] = typer.Option(None, "--base", help="Also bench this model and report speedup ratios (MODEL over BASE)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length (prefill), taken from the eval text."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Greedy tokens decoded with the KV cache."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs; medians are reported."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    backend: str = BACKEND_OPTION,
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="CI gate: exit 4 if MODEL decodes less than X times faster than --base."),
    device: str = DEVICE_OPTION,
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Prefill and decode tokens/s, latency per token and memory (medians over repeats)."""
    from quantcli import console
    from quantcli.gates import GateLimits, enforce
    from quantcli.speed import BenchConfig
    from quantcli.speed import bench as run_bench

    config = BenchConfig(prompt_tokens, new_tokens, repeats, warmup, backend=backend)
    result = run_bench(model, config, base, device, GateLimits(min_speedup=min_speedup), console.RichProgress(enabled=not quiet))
    console.print_json(result) if json_output else console.render_bench(result)
    enforce(result["gates"])


@app.command()
def methods() -> None:
    """List the quantization methods and whether each can run here."""
    from quantcli.cliflags import cli_text
    from quantcli.methods import available_methods

    for cls in available_methods():
        reason = cls().unavailable_reason("cpu")
        reason = reason and cli_text(reason)
        bits = "/".join(map(str, cls.supported_bits))
        status = f"  (CPU: {reason})" if reason else ""
        print(f"{cls.name:10} {bits:7} {cls.summary}{status}")


def main() -> None:
    app()


def _help_sections() -> None:
    from quantcli.helptext import add_help_sections

    add_help_sections(app)


_help_sections()
