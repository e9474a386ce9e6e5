"""Decode GGUF quantization blocks into `GroupWeights` without going through fp32.

Each decoder takes the raw bytes of a row-major (N, K) matrix as stored in the file (N rows of
K / block_size blocks) and returns the integers, scales and offsets the blocks encode, chosen so
that `GroupWeights.dequantize` repeats gguf's reference arithmetic operation for operation
(tests/quant compare the two bit for bit). Layouts follow the GGML block definitions:

- Q8_0 (34 bytes / 32 weights): fp16 d, 32 int8 q.                  w = d * q
- Q4_0 (18 bytes / 32 weights): fp16 d, 16 bytes of nibbles.        w = d * (q - 8)
- Q4_1 (20 bytes / 32 weights): fp16 d, fp16 m, 16 bytes nibbles.   w = d * q + m
  (in both 4-bit formats byte j holds element j in its low nibble and element j + 16 in its high)
- Q5_0 (22 bytes / 32 weights): fp16 d, 4 bytes of fifth bits, 16 bytes nibbles.  w = d * (q - 16)
- Q5_1 (24 bytes / 32 weights): fp16 d, fp16 m, 4 bytes fifth bits, nibbles.     w = d * q + m
  (nibbles as Q4_x; bit j of the little-endian 32-bit word is element j's fifth bit; kept as
  8-bit values, whose products with the fp16 scale are exact in fp32 like the 4-bit ones)
- Q4_K (144 bytes / 256): fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, then
  128 bytes where byte l of chunk c holds elements 64c + l (low) and 64c + 32 + l (high).
                                                                    w = (d*sc) * q - (dmin*m)
- Q6_K (210 bytes / 256): 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d.
                                                                    w = (d*sc) * (q - 32)
"""

from __future__ import annotations

import numpy as np
import torch

from pagoda.quant.group_weights import GroupWeights, pack_int4

_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144,
                "Q6_K": 210}
SUPPORTED = tuple(_BLOCK_BYTES)


def decode_blocks(raw: np.ndarray, qtype: str, num_cols: int) -> GroupWeights:
    """raw: (N, bytes_per_row) uint8 as in `GGUFReader.tensors[i].data`; num_cols = K."""
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"no GGUF-native decoder for {qtype}; supported: {SUPPORTED}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[qtype])  # (N, num_blocks, block_bytes)
    return _DECODERS[qtype](blocks, n, num_cols)


def _f16(b: np.ndarray) -> torch.Tensor:
    """(..., 2) bytes -> (...) fp16 tensor."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].copy())


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, B, 16) bytes of a 32-weight block -> (N, B, 32) values: low nibbles, then high."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _to_packed(values: np.ndarray, n: int) -> torch.Tensor:
    return pack_int4(torch.from_numpy(values.reshape(n, -1).astype(np.uint8)))


def _q8_0(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(n, k))
    return GroupWeights(q, _f16(blocks[..., 0:2]), None, 32, bits=8)


def _q4_0(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    # Signed q - 8 is kept as int8 so `d * (q - 8)` is evaluated exactly as gguf does.
    q = _split_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
    return GroupWeights(torch.from_numpy(q.reshape(n, k)), _f16(blocks[..., 0:2]), None, 32, 8)


def _q4_1(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    q = _to_packed(_split_nibbles(blocks[..., 4:]), n)
    return GroupWeights(q, _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]), 32, bits=4)


def _five_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """(N, B, 32) values 0..31 of Q5_x blocks whose fifth bits start at byte `at` (nibbles follow
    them)."""
    qh = np.ascontiguousarray(blocks[..., at:at + 4]).view("<u4")  # (N, B, 1)
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1  # (N, B, 32)
    return _split_nibbles(blocks[..., at + 4:at + 20]) | (high.astype(np.uint8) << 4)


def _q5_0(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    q = _five_bits(blocks, 2).astype(np.int8) - np.int8(16)  # d * (q - 16), as gguf computes
    return GroupWeights(torch.from_numpy(q.reshape(n, k)), _f16(blocks[..., 0:2]), None, 32, 8)


def _q5_1(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    q = _five_bits(blocks, 4).astype(np.int8)
    return GroupWeights(torch.from_numpy(q.reshape(n, k)), _f16(blocks[..., 0:2]),
                        _f16(blocks[..., 2:4]), 32, bits=8)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, B, 12) packed bytes -> two (N, B, 8) arrays of 6-bit scales and mins."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    d = _f16(blocks[..., 0:2]).float()[..., None]  # (N, B, 1)
    dmin = _f16(blocks[..., 2:4]).float()[..., None]
    sc, mn = _k_scales(blocks[..., 4:16])
    scales = d * torch.from_numpy(sc).float()  # (N, B, 8): one per 32-weight sub-block
    offsets = -(dmin * torch.from_numpy(mn).float())
    qs = blocks[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 64 weights
    values = np.stack((qs & 0x0F, qs >> 4), axis=3)  # (N, B, 4, 2, 32)
    return GroupWeights(_to_packed(values, n), scales.reshape(n, -1), offsets.reshape(n, -1),
                        32, bits=4)


def _q6_k(blocks: np.ndarray, n: int, k: int) -> GroupWeights:
    ql = blocks[..., 0:128].reshape(n, -1, 2, 2, 32)  # (half, [l, l+32], 32)
    qh = blocks[..., 128:192].reshape(n, -1, 2, 1, 32)
    sc = torch.from_numpy(blocks[..., 192:208].copy().view(np.int8)).float()  # (N, B, 16)
    d = _f16(blocks[..., 208:210]).float()[..., None]
    # Within a half of 128 weights: quarter 0 = low(ql[l]), 1 = low(ql[l+32]),
    # 2 = high(ql[l]), 3 = high(ql[l+32]); quarter i takes bits 2i..2i+1 of qh[l].
    low = np.stack((ql[..., 0, :] & 0x0F, ql[..., 1, :] & 0x0F,
                    ql[..., 0, :] >> 4, ql[..., 1, :] >> 4), axis=3)  # (N, B, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return GroupWeights(torch.from_numpy(q.reshape(n, k)), (d * sc).reshape(n, -1), None,
                        16, bits=8)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q4_K": _q4_k, "Q6_K": _q6_k}
