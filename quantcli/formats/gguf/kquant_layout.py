"""A layer on a K-quant grid (:class:`KWeights`), the values llama.cpp computes from it and its blocks as
``ggml`` lays them out (``block_q3_K`` ... ``block_q6_K`` in ``ggml-common.h``); the rounding is
:mod:`quantcli.formats.gguf.kquants`'. Tested against the ``gguf`` package's dequantizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

SUPER = 256  # inputs per super-block (ggml's QK_K)
BLOCK_BYTES = {"Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


@dataclass
class KWeights:
    """A layer on a K-quant grid: ``codes`` (int8 ``[out, in]``: Q4_K/Q5_K ``0..top``, Q3_K/Q6_K signed), the
    sub-block ``scales`` (Q3_K's signed ``-32..31``) and Q4_K/Q5_K's ``mins`` as stored (int16
    ``[out, in / sub]``), fp16 ``d`` (and ``dmin``) per super-block; ``type`` a
    :class:`~quantcli.formats.gguf.kquants.KType`."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None
    type: Any

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def pack(self) -> np.ndarray:
        return pack(self)


def steps(record: KWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sub-block's float32 step ``d·sc`` and subtracted minimum ``dmin·m``, ``[out, in / sub]``."""
    per = SUPER // record.type.sub
    step = record.d.float().repeat_interleave(per, dim=1) * record.scales.float()
    offset = None if record.mins is None else record.dmin.float().repeat_interleave(per, dim=1) * record.mins.float()
    return step, offset


def dequantize(record: KWeights) -> torch.Tensor:
    """The fp32 ``[out, in]`` values llama.cpp computes with (``gguf``'s dequantizer's arithmetic)."""
    rows, sub = record.codes.shape[0], record.type.sub
    step, offset = steps(record)
    values = step[..., None] * record.codes.float().reshape(rows, -1, sub)
    if offset is not None:
        values = values - offset[..., None]
    return values.reshape(record.codes.shape)


def _six_bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of 8 scales and 8 minimums: the low 6 bits of sub-blocks 0-3 in bytes 0-7,
    the high 2 bits of sub-blocks 4-7 on top of them, their low 4 bits in bytes 8-11."""
    import numpy as np

    return np.concatenate(
        [
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        axis=-1,
    )


def _sixteen_six_bit(scales: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of 16 scales (stored ``l`` = scale + 32): low nibbles of 0-7 then 8-15 in bytes 0-7,
    the high 2 bits of scale ``j`` in byte ``8 + j % 4`` at bit ``2·(j / 4)``."""
    import numpy as np

    low, high = scales & 15, scales >> 4
    pairs = low[..., :8] | (low[..., 8:] << 4)
    tops = high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4) | (high[..., 12:16] << 6)
    return np.concatenate([pairs, tops], axis=-1)


def pack(record: KWeights) -> np.ndarray:
    """The type's super-blocks, ``[out, in / 256 * bytes per block]`` uint8, as ``ggml`` lays them out.
    Q3_K: 32 bytes of high bits (bit ``j / 32`` of byte ``j % 32``), 64 of low 2-bit codes (each 128 inputs:
    4 runs of 32 in the 4 bit pairs), 12 of scales, fp16 ``d``. Q4_K: fp16 ``d``, ``dmin``, 12 bytes of
    scales and minimums, 128 of codes (each 64 inputs: the low nibbles the first 32, the high the next);
    Q5_K: the same with 32 bytes of fifth bits (bits ``2c``, ``2c+1`` for the two runs of chunk ``c``) before
    the codes. Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16 ``d``."""
    import numpy as np

    rows, name = record.codes.shape[0], record.type.name
    per = SUPER // record.type.sub
    d = record.d.cpu().numpy().astype(np.float16).reshape(rows, -1, 1).view(np.uint8)
    scales = record.scales.cpu().numpy().reshape(rows, -1, per)
    codes = record.codes.cpu().numpy().astype(np.int16)
    if record.type.has_min:
        sc, m = scales.astype(np.uint8), record.mins.cpu().numpy().astype(np.uint8).reshape(rows, -1, per)
        dmin = record.dmin.cpu().numpy().astype(np.float16).reshape(rows, -1, 1).view(np.uint8)
        levels = codes.astype(np.uint8).reshape(rows, -1, 4, 2, 32)
        quads = ((levels[..., 0, :] & 15) | ((levels[..., 1, :] & 15) << 4)).reshape(rows, -1, 128)
        parts = [d, dmin, _six_bit_pairs(sc, m)]
        if name == "Q5_K":
            high = levels >> 4  # [rows, blocks, chunk, run, 32]
            shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)[..., None]
            parts.append(np.bitwise_or.reduce((high << shifts).reshape(rows, -1, 8, 32), axis=2))
        parts.append(quads)
    elif name == "Q3_K":
        levels = (codes + 4).astype(np.uint8).reshape(rows, -1, SUPER)
        hmask = np.bitwise_or.reduce((levels >> 2).reshape(rows, -1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], 2)
        low = (levels & 3).reshape(rows, -1, 2, 4, 32)
        qs = low[..., 0, :] | (low[..., 1, :] << 2) | (low[..., 2, :] << 4) | (low[..., 3, :] << 6)
        stored = (scales.astype(np.int16) + 32).astype(np.uint8)
        parts = [hmask, qs.reshape(rows, -1, 64), _sixteen_six_bit(stored), d]
    else:
        levels = (codes + 32).astype(np.uint8).reshape(rows, -1, 2, 4, 32)
        low = levels & 15
        ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], axis=-1)
        high = levels >> 4
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), scales.astype(np.int8).view(np.uint8), d]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
