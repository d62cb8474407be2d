"""Streaming (``--low-memory``): quantize a model larger than memory one decoder block at a time.

The model is built as a skeleton on the meta device (no weights). :class:`ShardBlocks` is the block
source the driver (:func:`quantcli.quant.blockwise.quantize_blockwise`) reads: it loads one decoder
block's tensors from the safetensors shards (:mod:`quantcli.run.source_shards`), lets the method
quantize it (with calibration activations flowing from block to block, as in memory), writes the
block as its own output shard and frees it: peak memory is about one block plus the calibration
activations. The output is the same compressed-tensors checkpoint the in-memory run writes, tensor
for tensor.

Each finished shard is recorded in ``resume.json`` inside the staging folder, with the next block's
input hidden states (``activations.safetensors``) for calibrated methods; an interrupted run keeps
that folder, and ``--resume`` continues after the last finished block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantcli.checkpoint.atomic import RESUME_FILE
from quantcli.quant.finite import check_weight_range
from quantcli.quant.layers import weight_matrix
from quantcli.run.resume_state import (
    ACTIVATIONS_FILE,
    file_hash,
    fingerprint,
    read_state,
    record_from_json,
    record_to_json,
    versions,
    write_state,
)
from quantcli.run.source_shards import config_files, read_tensors, shard_groups, source_tensors
from quantcli.safetensors_dtypes import tensor_bytes
from quantcli.strict_json import write_json


class ShardBlocks:
    """The decoder blocks of ``source`` read from its shards one at a time, each written to
    ``staging`` as its own shard when quantized (same interface as :class:`quantcli.quant.blockwise.ModelBlocks`)."""

    def __init__(
        self,
        model: Any,
        names: tuple[str, ...],
        source: str,
        staging: Path,
        settings: dict[str, Any],
        output_format: Any,
        kept_dtype: Any = None,
    ) -> None:
        from quantcli.quant.blockwise import decoder_blocks

        self.model, self.staging, self.settings, self.format, self.names = (
            model,
            staging,
            settings,
            output_format,
            names,
        )
        self.kept_dtype = kept_dtype  # what tensors no quantized layer owns are written in (None: as held)
        from quantcli.quant.moe import checkpoint_renamer

        self.prefix, self.blocks = decoder_blocks(model, names)
        rename = checkpoint_renamer(model)  # the file's names as the model's (Mixtral: block_sparse_moe -> mlp)
        files = source_tensors(source)
        self.disk = {rename(key): key for key in files}
        self.where = {rename(key): file for key, file in files.items()}
        self.groups = shard_groups(list(self.where), self.prefix, len(self.blocks))
        self.shards = [
            f"model-{index:05d}-of-{len(self.groups):05d}.safetensors" for index in range(1, len(self.groups) + 1)
        ]
        self.records: dict[str, Any] = {}
        self.modules = dict(model.named_modules())
        self.known = {name for name, _ in model.named_parameters(remove_duplicate=False)} | {
            name for name, _ in model.named_buffers()
        }
        inputs = fingerprint([*self.where.values(), *config_files(source)])
        self.settings = {**settings, "source_files": inputs, "versions": versions()}
        self.state = read_state(staging, self.settings, self.shards)  # {} for a fresh run; checked before any reuse
        self.done = list(self.state.get("done", []))
        self.hashes = dict(self.state.get("hashes", {}))
        self.resumed = len(self.done)
        self.written = {name: record for name, record in self.state.get("written", {}).items() if name in names}
        self._save_state()

    def _save_state(self, **extra: Any) -> None:
        current = {"settings": self.settings, "done": self.done, "written": self.written, "hashes": self.hashes}
        self.state = {"activations_for": None, **self.state, **extra, **current}
        write_state(self.staging, self.state)

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, tensor in read_tensors([name for name in names if name in self.known], self.where, self.disk).items():
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor)
        self.model.tie_weights()  # a tied head shares the embedding's new tensor again

    def _free(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            if name in self.known:
                set_module_tensor_to_device(self.model, name, "meta")
        self.model.tie_weights()

    def resume_point(self) -> tuple[int, Any]:
        """The first unfinished block and its saved calibration inputs (None without calibration)."""
        start, hidden = self._saved_inputs(self._finished_blocks())
        for name, record in self.written.items():
            self.records[name] = record_from_json(name, record, tuple(self.modules[name].weight.shape), self.staging)
        return start, hidden

    def _finished_blocks(self) -> int:
        start = 0
        while start < len(self.blocks) and self.shards[start] in self.done:
            start += 1
        return start

    def _saved_inputs(self, start: int) -> tuple[int, Any]:
        if not self.settings.get("calibration") or start in (0, len(self.blocks)):
            return start, None
        if self.state.get("activations_for") != start or not (self.staging / ACTIVATIONS_FILE).exists():
            self.done, self.written = [], {}  # no saved inputs for the first unfinished block: start over
            return 0, None
        from safetensors.torch import load_file

        saved = load_file(self.staging / ACTIVATIONS_FILE)
        return start, [saved[str(index)] for index in range(len(saved))]

    def _rest(self) -> list[str]:
        return [name for group in self.groups[len(self.blocks) :] for name in group]

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[Any]:
        rest = self._rest()
        self._load(rest)
        try:
            yield self.model
        finally:
            self._free(rest)

    def _check_range(self, layers: list[str]) -> None:
        """Refuse a layer whose values are too large for a finite scale, as the in-memory run does up front."""

        for name in layers:
            check_weight_range(name, weight_matrix(self.modules[name]), "")

    def open(self, index: int) -> Any:
        self._load(self.groups[index])
        self._check_range([name for name in self.names if name.startswith(f"{self.prefix}.{index}.")])
        return self.blocks[index]

    def close(self, index: int, records: dict[str, Any], hidden: Any) -> None:
        if hidden is not None and index + 1 < len(self.blocks):
            from safetensors.torch import save_file

            save_file(
                {str(i): h.contiguous() for i, h in enumerate(hidden)}, str(self.staging / f"{ACTIVATIONS_FILE}.tmp")
            )
            (self.staging / f"{ACTIVATIONS_FILE}.tmp").rename(self.staging / ACTIVATIONS_FILE)
            self.hashes[ACTIVATIONS_FILE] = file_hash(self.staging / ACTIVATIONS_FILE)
        self._write(index, records)
        self._free(self.groups[index])
        self.records.update({name: _placeholder(record) for name, record in records.items()})
        self.written.update({name: record_to_json(self.records[name]) for name in records if records[name] is not None})
        self._save_state(activations_for=index + 1 if hidden is not None else None)

    @contextlib.contextmanager
    def layer(self, name: str) -> Iterator[None]:
        tensors = [key for key in self.where if key.rsplit(".", 1)[0] == name]
        self._load(tensors)
        self._check_range([name])
        yield

    def close_layer(self, name: str, record: Any) -> None:
        self.records[name] = record  # written with its module's shard by finish()

    def _write(self, index: int, records: dict[str, Any]) -> None:
        """Shard ``index``: quantized layers compressed, every other tensor as the model holds it."""
        from safetensors.torch import save_file

        if self.shards[index] in self.done:
            return
        tensors = {}
        for key in self.groups[index]:
            layer, _, kind = key.rpartition(".")
            written = self.disk.get(key, key).rpartition(".")[0]  # the name the source file uses, as in memory
            if kind == "weight" and records.get(layer) is not None:
                stored = self.format.layer_tensors(layer, records[layer], self.modules[layer])
                tensors.update({f"{written}.{part}": value for part, value in stored.items()})
                tensors.update(self.format.tied_tensors(self.model, layer, stored))
            elif self.disk.get(key, key) not in tensors:
                value = self._current(key)
                kept = self.kept_dtype is not None and value.is_floating_point()
                tensors[self.disk.get(key, key)] = value.to(self.kept_dtype) if kept else value
        path = self.staging / self.shards[index]
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
        self.hashes[self.shards[index]] = file_hash(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        self.done.append(self.shards[index])

    def _current(self, key: str) -> Any:
        """A tensor as the model holds it (loaded), or as the source stores it, in the model's dtype."""
        if key not in self.known:
            return read_tensors([key], self.where, self.disk)[key]
        layer, _, kind = key.rpartition(".")
        held = getattr(self.modules[layer], kind)
        if held.device.type != "meta":
            return held.detach()
        stored = read_tensors([key], self.where, self.disk)[key]
        return stored.to(held.dtype) if stored.is_floating_point() else stored

    def finish(self) -> int:
        """Write the modules outside the blocks, the index, config and quantization config; returns bytes of weights.
        Records of ``None`` (layers a method keeps dense) are written as the model holds them."""
        from safetensors import safe_open

        for index in range(len(self.blocks), len(self.groups)):
            layers = {key.rsplit(".", 1)[0] for key in self.groups[index]}
            self._write(index, {name: record for name, record in self.records.items() if name in layers})
            self._save_state()
        weight_map, total = {}, 0
        for shard in self.shards:
            with safe_open(self.staging / shard, framework="pt") as handle:
                for key in handle.keys():
                    weight_map[key] = shard
                    total += tensor_bytes(handle, key)
        write_json(
            self.staging / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
        self.model.config.save_pretrained(self.staging)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(self.staging)
        self.format.finish(
            self.model, {name: record for name, record in self.records.items() if record is not None}, self.staging
        )
        (self.staging / RESUME_FILE).unlink()
        (self.staging / ACTIVATIONS_FILE).unlink(missing_ok=True)
        return total


def _placeholder(record: Any) -> Any:
    """A written layer's record with its tensors on ``meta``: shapes and layout stay, memory goes."""
    import dataclasses

    if record is None:
        return None
    return dataclasses.replace(
        record,
        **{
            f.name: getattr(record, f.name).to("meta")
            for f in dataclasses.fields(record)
            if hasattr(getattr(record, f.name), "to")
        },
    )
