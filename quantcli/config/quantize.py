"""Frozen, validated run configurations: each option is checked here, once, when a config is built.

Recipes (YAML files, mappings and command-line overrides) become a :class:`QuantizeConfig` in
:mod:`quantcli.config.recipes`; its functions can also be imported from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcli.config.allocation import AllocationConfig
from quantcli.config.gates import GateLimits
from quantcli.config.validators import check_positive, check_type, parse_size
from quantcli.errors import InputError, option
from quantcli.formats.gguf.types import TYPES, block_type
from quantcli.limits import bound_calibration, bound_eval, shown
from quantcli.methods import capable
from quantcli.sources.models import DEFAULT_MODEL

DEFAULT_CALIB_DATASET = "tinystories:calib"
DEFAULT_EVAL_DATASET = "tinystories:eval"
BOS_MODES = ("auto", "start", "none")
PROTOCOLS = ("stream", "documents")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text to calibrate on and how much of it: ``samples`` windows of ``seq_len`` tokens."""

    dataset: str = DEFAULT_CALIB_DATASET
    samples: int = 128
    seq_len: int = 256
    seed: int = 0
    text_column: str | None = None

    def __post_init__(self) -> None:
        check_type("calibration dataset", self.dataset, str)
        check_type(f"text column ({option('calibration.text_column')})", self.text_column, str, type(None))
        check_type(f"calibration seed ({option('calibration.seed')})", self.seed, int)
        check_positive(f"calibration samples ({option('calibration.samples')})", self.samples)
        check_positive(f"calibration sequence length ({option('calibration.seq_len')})", self.seq_len)
        bound_calibration(self)


@dataclass(frozen=True)
class EvalConfig:
    """Sliding-window perplexity settings; every number quantcli reports carries these."""

    dataset: str = DEFAULT_EVAL_DATASET
    seq_len: int = 256
    stride: int | None = None
    max_tokens: int | None = 32768
    bos: str = "auto"
    batch_size: int = 8
    protocol: str = "stream"
    text_column: str | None = None
    doc_separator: str | None = None

    def __post_init__(self) -> None:
        check_type("eval dataset", self.dataset, str)
        check_type(f"text column ({option('eval.text_column')})", self.text_column, str, type(None))
        check_type(f"document separator ({option('eval.doc_separator')})", self.doc_separator, str, type(None))
        check_positive(f"eval sequence length ({option('eval.seq_len')})", self.seq_len)
        if self.seq_len < 2:
            raise InputError(
                f"eval sequence length ({option('eval.seq_len')}) must be at least 2 (a window predicts each token "
                f"from the ones before it), got {self.seq_len}."
            )
        check_positive(f"stride ({option('eval.stride')})", self.stride, allow_none=True)
        check_positive(f"max tokens ({option('eval.max_tokens')})", self.max_tokens, allow_none=True)
        check_positive(f"batch size ({option('eval.batch_size')})", self.batch_size)
        bound_eval(self)
        if self.stride is not None and self.stride > self.seq_len:
            raise InputError(
                f"stride {self.stride} is larger than the context length {self.seq_len}: tokens would be"
                f" skipped. Use a stride at most {option('eval.seq_len')}."
            )
        if self.bos == "document":
            raise InputError(
                f"{option('eval.bos', 'document')} is now {option('eval.protocol', 'documents')} "
                f"{option('eval.bos', 'start')}"
                f" (documents come from rows or {option('eval.doc_separator')}; a blank line is not one)."
            )
        if self.bos not in BOS_MODES:
            raise InputError(f"bos must be one of {', '.join(BOS_MODES)}, got {shown(self.bos)}.")
        if self.protocol not in PROTOCOLS:
            raise InputError(
                f"protocol ({option('eval.protocol')}) must be one of {', '.join(PROTOCOLS)}, got "
                f"{shown(self.protocol)}."
            )
        if self.doc_separator is not None and (self.protocol != "documents" or not self.doc_separator):
            raise InputError(
                f"{option('eval.doc_separator')} needs {option('eval.protocol', 'documents')} and a non-empty string."
            )

    @property
    def effective_stride(self) -> int:
        return self.stride or self.seq_len


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bits": (int,),
    "model": (str,),
    "method": (str, type(None)),
    "output": (Path, type(None)),
    "force": (bool,),
    "device": (str,),
    "dtype": (str,),
    "trust_remote_code": (bool,),
    "low_memory": (bool,),
    "resume": (bool,),
    "device_map": (str, type(None)),
    "embeddings": (int, str, type(None)),
    "keep_dtype": (str, type(None)),
    "format": (str, type(None)),
    "gguf_type": (str, type(None)),
}
EMBEDDING_CHOICES = (8, 4, "keep")
KEEP_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one ``quantcli quantize`` run needs."""

    bits: int
    model: str = DEFAULT_MODEL
    method: str | None = None
    output: Path | None = None
    force: bool = False
    skip_modules: tuple[str, ...] = ()
    method_options: Mapping[str, Any] = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    device: str = "auto"
    device_map: str | None = None  # accelerate placement over several GPUs (and CPU) instead of one device
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_shard_size: int | str | None = None
    low_memory: bool = False  # stream the weights from disk one decoder block at a time (no perplexity)
    resume: bool = False  # with low_memory: continue an interrupted run after its last finished block
    gates: GateLimits = field(default_factory=GateLimits)
    allocation: AllocationConfig | None = (
        None  # a size or quality target: per-layer precision is searched (quantcli.allocate)
    )
    # rtn/gptq: the input embedding and output head (one tensor when tied): None or "keep" keeps them 16-bit (what
    # vLLM serves; the default), 8 or 4 quantizes them
    embeddings: int | str | None = None
    keep_dtype: str | None = (
        None  # rtn/gptq: dtype of unquantized tensors; None, auto: 16-bit (quantcli.quant.keptdtype)
    )
    format: str | None = None  # None: the method's own format; "gguf": llama.cpp's, with gguf_type
    gguf_type: str | None = None  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (quantcli.formats.gguf.types)

    def __post_init__(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            check_type(f"'{name}'", getattr(self, name), *kinds)
        if isinstance(self.embeddings, str) and self.embeddings.isdigit():
            object.__setattr__(self, "embeddings", int(self.embeddings))
        if self.embeddings not in (*EMBEDDING_CHOICES, None):
            raise InputError(f"{option('embeddings')} must be 8, 4 or keep, got {shown(self.embeddings)}.")
        if self.keep_dtype not in (*KEEP_DTYPES, None):
            raise InputError(f"{option('keep_dtype')} must be {', '.join(KEEP_DTYPES)}, got {shown(self.keep_dtype)}.")
        if self.max_shard_size is not None:
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        if self.format is not None or self.gguf_type is not None:
            self._check_gguf()
        elif self.bits not in (3, 4, 8, 16):
            raise InputError(
                f"{option('bits', self.bits)} is not supported. Use 8 or 4 (bnb, rtn, gptq), 3 (gptq), or 16 (the "
                "fp16/bf16 baseline)."
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"{option('device')} must be auto, cpu, cuda or cuda:N, got {shown(self.device)}.")
        if self.resume and not self.low_memory:
            raise InputError(
                f"{option('resume')} continues an interrupted {option('low_memory')} run. Add "
                f"{option('low_memory', True)}."
            )
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise InputError(
                f"{option('device_map')} must be one of {', '.join(DEVICE_MAPS)}, got {shown(self.device_map)}."
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InputError(f"{option('dtype')} must be auto, float32, float16 or bfloat16, got {shown(self.dtype)}.")
        if self.low_memory:
            self._check_streaming()
        if self.allocation is not None:
            self._check_allocation()
        if self.method_options.get("activations") is not None or self.method_options.get("smoothing") is not None:
            self._check_activations()
        if self.gates.max_ppl_increase is not None and self.eval is None:
            raise InputError(
                f"{option('gates.max_ppl_increase')} needs perplexity before and after. Drop {option('eval', None)}"
                f" (use {option('eval.max_tokens')} to keep it fast)."
            )
        if self.gates.min_speedup is not None:
            raise InputError(
                f"{option('gates.min_speedup')} needs decode speed of both models: use it with `quantcli bench "
                "QUANTIZED --base ORIGINAL`."
            )

    def _check_allocation(self) -> None:
        if self.low_memory:
            raise InputError(
                f"{option('allocation')} searches per-layer precision on the whole model in memory; drop "
                f"{option('low_memory', True)}."
            )
        if self.format is not None:
            raise InputError(
                f"{option('allocation')} writes a mixed-precision compressed-tensors checkpoint; drop "
                f"{option('format', 'gguf')}."
            )
        if self.method is not None:
            allocating = capable("allocates")
            if self.method not in allocating:
                names = " or ".join([option("method", allocating[0]), *allocating[1:]])
                raise InputError(f"{option('allocation')} allocates with {names}, not {self.method}.")

    def _check_activations(self) -> None:
        """W8A8 writes compressed-tensors ``int-quantized`` layers, inputs quantized (quantcli.quant.activations)."""
        if self.format is not None:
            raise InputError(
                f"{option('activations', 'int8')} writes compressed-tensors W8A8 for vLLM; llama.cpp's GGUF types"
                f" quantize activations themselves. Drop {option('format', 'gguf')}."
            )
        if self.allocation is not None:
            raise InputError(
                f"{option('allocation')} searches weight-only precision per layer;"
                f" drop {option('activations', 'int8')}."
            )
        if self.method_options.get("smoothing") is not None and self.low_memory:
            raise InputError(
                f"{option('smoothing')} calibrates on the whole model in memory; drop {option('low_memory', True)}."
            )

    def _check_gguf(self) -> None:
        if self.format is None:
            raise InputError(f"{option('gguf_type')} needs {option('format', 'gguf')}.")
        if self.format != "gguf":
            raise InputError(
                f"{option('format')} takes gguf (other formats follow from {option('method')}), got "
                f"{shown(self.format)}."
            )
        if self.gguf_type is None:
            raise InputError(f"{option('format', 'gguf')} needs {option('gguf_type')}: one of {', '.join(TYPES)}.")
        kind = block_type(self.gguf_type)
        if self.bits != kind.bits:
            raise InputError(
                f"{option('gguf_type', kind.name)} stores {kind.bits}-bit codes, but {option('bits')} is {self.bits}. "
                f"Drop {option('bits')} (the type sets it)."
            )
        if self.low_memory:
            raise InputError(
                f"{option('format', 'gguf')} writes one file from the whole model; drop {option('low_memory', True)}."
            )
        if self.max_shard_size is not None:
            raise InputError(f"{option('format', 'gguf')} writes one file; drop {option('max_shard_size')}.")

    def _check_streaming(self) -> None:
        if self.gates.max_ppl_increase is not None:
            raise InputError(
                f"{option('gates.max_ppl_increase')} needs perplexity before and after, which "
                f"{option('low_memory', True)} cannot measure (it never holds"
                f" the whole model). Drop {option('gates.max_ppl_increase')}, or {option('low_memory', True)} if the "
                "model fits in memory."
            )
        if self.eval is not None:
            raise InputError(
                f"{option('low_memory', True)} cannot measure perplexity (it never holds the whole model). Add "
                f"{option('eval', None)},"
                f" or drop {option('low_memory', True)}."
            )
        if self.max_shard_size is not None:
            raise InputError(
                f"{option('low_memory', True)} writes one shard per decoder block; drop {option('max_shard_size')}."
            )
        if self.device_map is not None:
            raise InputError(
                f"{option('low_memory', True)} loads one block at a time on the CPU; drop {option('device_map')}."
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output) if self.output else None
        data["skip_modules"] = list(self.skip_modules)
        data["method_options"] = dict(self.method_options)
        return data
