"""Preparing a per-layer precision search: the candidates' rounded weights, sensitivities and the
verification text."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from quantcli.allocate.candidates import checkpoint_bytes
from quantcli.allocate.search import (
    _layouts,
    layer_options,
    probe,
    table_options,
)
from quantcli.allocate.sensitivity import hessians, output_fisher
from quantcli.allocate.verify import Verifier, windows
from quantcli.config.allocation import parse_candidates
from quantcli.quant.keptdtype import storage_dtype
from quantcli.quant.records import QuantizeRequest
from quantcli.sources.datasets import read_documents


@dataclass
class Prepared:
    """Everything target-independent: the original model, each layer's options with predicted costs,
    the proxy check and the verifier; one preparation serves any number of targets."""

    model: Any
    base: Any
    table: dict[str, list[Any]]
    candidates: tuple[Any, ...]
    check: dict[str, Any]
    verify: Verifier
    texts: tuple[str, str, str]
    seconds: dict[str, float]
    kept_dtype: str | None = None  # the dtype unquantized tensors are stored in (quantcli.quant.keptdtype)

    def bytes(self, choice: dict[str, int]) -> int:
        return checkpoint_bytes(self.model, _layouts(self.table, choice), self.kept_dtype)


def prepare(request: QuantizeRequest, method: str, config: Any, progress: Any) -> Prepared:
    """Measure sensitivities and round every layer every way (``request.model`` is left unchanged)."""
    alloc, calib, model = config.allocation, config.calibration, request.model
    candidates = parse_candidates(list(alloc.candidates))
    search_spec = alloc.search_dataset or calib.dataset
    verify_spec = alloc.verify_dataset or (config.eval.dataset if config.eval is not None else calib.dataset)
    search_source, verify_source = (
        read_documents(search_spec, calib.text_column),
        read_documents(verify_spec, calib.text_column),
    )
    seq_len = config.eval.seq_len if config.eval is not None else calib.seq_len
    seconds: dict[str, float] = {}

    kept = storage_dtype(config.keep_dtype or "auto", request.source, model)
    kept_dtype = str(kept).removeprefix("torch.") if kept is not None else None
    start = time.perf_counter()
    base = copy.deepcopy(model).eval()
    with progress.task("allocation: Hessians and output Fisher", total=None):
        found = hessians(model, request.layers, request.calibration)
        fisher = output_fisher(model, request.layers, request.calibration[: alloc.fisher_samples], calib.seed)
    seconds["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task(
        f"allocation: {len(candidates)} candidates per layer ({method})", total=len(request.layers)
    ) as advance:
        table = layer_options(
            model,
            request.layers,
            candidates,
            method,
            request.config,
            found,
            fisher,
            lambda n: (advance(n), request.progress(n)),
            kept.itemsize if kept is not None else None,
            request.scale_dtype,
        )
    del found
    seconds["candidates"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress.task("allocation: proxy check on the search text", total=None):
        search = windows(search_source, request.tokenizer, alloc.search_tokens, calib.seq_len, "search")
        check = probe(model, base, table, search, alloc.probe_layers)
    for options in table.values():
        for opt in options:
            opt.predicted = check["scale"] * opt.proxy
    keep = any(c.bits is None for c in candidates)
    table.update(
        table_options(model, base, request, search, keep, kept.itemsize if kept is not None else None)
    )  # costs measured, not predicted
    verify = Verifier(
        base,
        windows(verify_source, request.tokenizer, alloc.verify_tokens, seq_len, "verification"),
        verify_spec,
        alloc.confidence,
    )
    seconds["proxy_check"] = time.perf_counter() - start
    return Prepared(
        model, base, table, candidates, check, verify, (calib.dataset, search_spec, verify_spec), seconds, kept_dtype
    )
