"""``quantcli quantize``: options → a checked QuantizeConfig → the pipeline → the report (and its gates)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from quantcli.cli import render
from quantcli.cli.boundary import handle_errors
from quantcli.cli.options import JSON_OPTION, QUIET_OPTION, given
from quantcli.config.gates import enforce
from quantcli.config.recipes import merge_quantize_config

# Literal so --help stays fast; tests/cli/test_help.py holds it to the method registry (names, defaults).
METHOD_HELP = (
    "rtn, gptq, awq, gptq-nf4, blockround, blockround-nf4, bnb-int8, bnb-nf4, bnb-fp4, cast. Default: 16-bit cast;"
    " 8-bit bnb-int8 on CUDA, rtn on CPU; 4-bit bnb-nf4 on CUDA, rtn on CPU; 3-bit gptq."
)


@handle_errors
def quantize(
    model: str | None = typer.Argument(
        None, help="Hub id, local folder, or 'stories260K' (the embedded default).", show_default="stories260K"
    ),
    bits: int | None = typer.Option(None, "--bits", "-b", help="8 or 4 (3 with rtn/gptq; 16 casts to fp16/bf16)."),
    method: str | None = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder. Default: MODEL-METHOD-wBITS."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe; options given here override it."),
    output_format: str | None = typer.Option(
        None,
        "--format",
        help="gguf: one llama.cpp file (with --gguf-type; rtn or gptq). Default: the method's own format.",
    ),
    gguf_type: str | None = typer.Option(
        None,
        "--gguf-type",
        help="With --format gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K or the mixes Q3_K_M, Q4_K_M,"
        " Q5_K_M (sets --bits).",
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", "-g", help="Weights per scale (rtn/gptq; -1 per channel)."
    ),
    symmetric: bool | None = typer.Option(
        None, "--symmetric/--asymmetric", help="Symmetric or zero-point integers (rtn/gptq)."
    ),
    double_quant: bool | None = typer.Option(
        None, "--double-quant/--no-double-quant", help="Quantize the 4-bit scales too (bnb-nf4/fp4)."
    ),
    act_order: bool | None = typer.Option(
        None, "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing activation energy."
    ),
    clip_search: bool | None = typer.Option(
        None, "--clip-search/--no-clip-search", help="GPTQ: choose each row's range by its output error (default on)."
    ),
    importance: bool | None = typer.Option(
        None,
        "--importance/--no-importance",
        help="GPTQ with --format gguf: block scales by llama.cpp's imatrix search on diag(H) (default on).",
    ),
    observer: str | None = typer.Option(
        None,
        "--observer",
        help="How rtn/gptq pick scales: signed (Q4_0: largest weight on the lowest code; default below 8 bits, "
        "symmetric), minmax (absmax; default at 8 bits and asymmetric) or mse (clipping search).",
    ),
    embeddings: str | None = typer.Option(
        None,
        "--embeddings",
        help=(
            "rtn/gptq: the input embedding and output head (one tensor when tied): keep (16-bit, default: vLLM serves"
            " it), 8 (int8 in groups of 32) or 4 (the layers' grid); vLLM cannot serve 8 or 4 (--format gguf quantizes"
            " them for llama.cpp)."
        ),
    ),
    activations: str | None = typer.Option(
        None,
        "--activations",
        help=(
            "int8: W8A8 for vLLM's int8 kernels (rtn/gptq --bits 8, per channel): each layer's inputs quantized per "
            "token"
            " at run time, in quantcli's eval too."
        ),
    ),
    smoothing: float | None = typer.Option(
        None,
        "--smoothing",
        help=(
            "With --activations int8: SmoothQuant's strength alpha (0-1; 0.8 was best on SmolLM2), calibrated on"
            " --calib-dataset: activation outliers moved into the weights."
        ),
    ),
    keep_dtype: str | None = typer.Option(
        None,
        "--keep-dtype",
        help="rtn/gptq: dtype of tensors left unquantized (norms, biases, a kept head): auto (16-bit; default) or "
        "float32, bfloat16, float16.",
    ),
    skip_modules: list[str] | None = typer.Option(
        None, "--skip-modules", help="Glob of layer names to keep in full precision (repeatable)."
    ),
    option: list[str] | None = typer.Option(
        None,
        "--option",
        "-O",
        help="A method option not worth a flag, KEY=VALUE (repeatable), e.g. -O damp=0.05; checked by the method.",
    ),
    calib_dataset: str | None = typer.Option(
        None,
        "--calib-dataset",
        help="Calibration text: a local text file, .jsonl/.csv/.parquet, or a Hub spec path:config:split.",
    ),
    calib_samples: int | None = typer.Option(None, "--calib-samples", help="Calibration windows."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per calibration and evaluation window."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for calibration sampling."),
    text_column: str | None = typer.Option(
        None, "--text-column", help="Column holding the text in .jsonl/.csv/.parquet/Hub data (default: 'text')."
    ),
    eval_dataset: str | None = typer.Option(
        None, "--eval-dataset", help="Evaluation text (kept apart from calibration)."
    ),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Evaluate on at most this many tokens."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip perplexity before/after."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    device_map: str | None = typer.Option(
        None,
        "--device-map",
        help="Spread the model over all GPUs (and CPU) with accelerate: auto, balanced, sequential.",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model repo's own Python code (off by default)."
    ),
    max_shard_size: str | None = typer.Option(
        None,
        "--max-shard-size",
        help="Split the weights into shards of at most this size (e.g. 2GB, 500MB) plus an index.",
    ),
    low_memory: bool = typer.Option(
        False,
        "--low-memory",
        help="Stream the weights from disk one decoder block at a time (rtn, gptq, gptq-nf4), for models larger than "
        "memory (no perplexity).",
    ),
    sequential: bool = typer.Option(False, "--sequential", hidden=True, help="Deprecated name of --low-memory."),
    resume: bool = typer.Option(
        False, "--resume", help="With --low-memory: continue an interrupted run after its last finished block."
    ),
    max_ppl_increase: float | None = typer.Option(
        None, "--max-ppl-increase", help="CI gate, in percent: exit 4 if perplexity rises more (2 = 2%)."
    ),
    max_size: float | None = typer.Option(
        None, "--max-size", help="CI gate: exit 4 if the quantized weights exceed this many MB (10^6 bytes) on disk."
    ),
    target_ppl_increase: float | None = typer.Option(
        None,
        "--target-ppl-increase",
        help="Per-layer precision: the smallest checkpoint whose perplexity rises at most this many percent"
        " (rtn/gptq).",
    ),
    target_kl: float | None = typer.Option(
        None,
        "--target-kl",
        help="Per-layer precision: the smallest checkpoint within this mean KL vs the original (nats/token).",
    ),
    target_size: str | None = typer.Option(
        None,
        "--target-size",
        help="Per-layer precision: the best quality within this checkpoint size on disk (80MB, 1.5GB).",
    ),
    target_bpw: float | None = typer.Option(
        None, "--target-bpw", help="Per-layer precision: the best quality within this many bits per weight on disk."
    ),
    candidates: str | None = typer.Option(
        None,
        "--candidates",
        help="With --target-*: comma-separated choices per layer (default "
        "keep,int8,int4-g128,int4-g64,int4-g32,int3-g32).",
    ),
    search_dataset: str | None = typer.Option(
        None, "--search-dataset", help="With --target-*: text for the proxy check (default: the calibration text)."
    ),
    verify_dataset: str | None = typer.Option(
        None,
        "--verify-dataset",
        help="With --target-*: held-out text each allocation is verified on (default: the eval text).",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="With --target-*: draw the searched size/quality curve and the uniform schemes to this PNG.",
    ),
    json_output: bool = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Quantize MODEL, write the checkpoint, and report size and perplexity before and after."""
    from quantcli.run.pipeline import quantize as run_quantize

    if sequential:
        print("warning: --sequential is deprecated; it is now called --low-memory.", file=sys.stderr)
        low_memory = True
    switches = {"force": force, "trust_remote_code": trust_remote_code, "low_memory": low_memory, "resume": resume}
    skip = [glob for value in skip_modules for glob in value.split(",") if glob] if skip_modules else None
    recipe = config  # the recipe file: protected from --force like the model (quantcli.checkpoint.inputs)
    config = merge_quantize_config(
        config,
        top={
            **given(
                model=model,
                bits=bits,
                method=method,
                output=output,
                device=device,
                device_map=device_map,
                dtype=dtype,
                max_shard_size=max_shard_size,
                skip_modules=skip,
                embeddings=embeddings,
                keep_dtype=keep_dtype,
                format=output_format,
                gguf_type=gguf_type,
            ),
            **{key: True for key, value in switches.items() if value},
        },
        method_options=given(
            group_size=group_size,
            symmetric=symmetric,
            double_quant=double_quant,
            act_order=act_order,
            clip_search=clip_search,
            importance=importance,
            observer=observer,
            activations=activations,
            smoothing=smoothing,
        ),
        calibration=given(
            dataset=calib_dataset, samples=calib_samples, seq_len=seq_len, seed=seed, text_column=text_column
        ),
        evaluation=None
        if no_eval
        else given(dataset=eval_dataset, seq_len=seq_len, max_tokens=max_tokens, text_column=text_column),
        gates=given(max_ppl_increase=max_ppl_increase, max_size=max_size),
        options=option or [],
        allocation=given(
            target_ppl_increase=target_ppl_increase,
            target_kl=target_kl,
            target_size=target_size,
            target_bpw=target_bpw,
            candidates=candidates,
            search_dataset=search_dataset,
            verify_dataset=verify_dataset,
            plot=None if plot is None else str(plot),
        ),
    )
    report = run_quantize(config, render.RichProgress(enabled=not quiet), recipe=recipe)
    data = report.to_dict()
    render.print_json(data) if json_output else render.render_quantize(data)
    enforce(data["gates"])
