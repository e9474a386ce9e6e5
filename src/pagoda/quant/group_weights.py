"""`GroupWeights`: a weight matrix as small integers with a scale (and offset) per group.

One representation covers Pagoda's own int4 and the GGUF block formats, so a GGUF file's blocks are
kept as they are rather than re-rounded:

    w[n, k] = scales[n, k // g] * q[n, k] + offsets[n, k // g]      (offsets may be absent)

Invariants:
- groups run along the input dimension, so permuting or concatenating *rows* is exact;
- 4-bit values are unsigned (0..15) and packed two per byte, element 2i in the low nibble;
  8-bit values are signed int8 stored as is (Q8_0, and 6-bit Q6_K values shifted to -32..31);
- `dequantize` evaluates exactly `scales * q + offsets` in fp32, the same expression (and
  rounding) as gguf's reference dequantization for the formats `gguf_blocks` decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows requantized at once: bounds the transient fp32 copy (4096 x 576 floats = 9 MB).
_ROW_CHUNK = 4096


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values in 0..15 -> (N, K/2) bytes; element 2i in the low nibble."""
    assert q.dtype == torch.uint8 and q.shape[-1] % 2 == 0
    assert int(q.max()) <= 15, "int4 values must be in 0..15"
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) bytes -> (N, K) uint8 values in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~ q * scale[:, None], q in -127..127 (zero point 0)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class WeightSlice:
    """The part of a full weight matrix that a linear holds (a tensor-parallel shard): rows by
    index (an index past the last row is a row of zeros: the LM head's vocabulary padding) and
    one contiguous range of columns."""

    rows: torch.Tensor  # int64 indices into the full matrix's rows
    cols: range

    def take_rows(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s rows at `rows` (those past its end: zeros); every column."""
        n = t.shape[0]
        if self.rows.numel() and int(self.rows.max()) >= n:  # pad only when an index needs it
            t = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
        return t[self.rows.clamp(max=n)]


@dataclass
class GroupWeights:
    qweight: torch.Tensor  # (N, K/2) uint8 when bits == 4, else (N, K) int8
    scales: torch.Tensor  # (N, K/g) fp16 or fp32
    offsets: torch.Tensor | None  # (N, K/g) like scales, or None (symmetric)
    group_size: int
    bits: int  # 4 or 8

    def __post_init__(self) -> None:
        assert self.bits in (4, 8)
        n, k = self.shape
        assert self.scales.shape == (n, k // self.group_size), (self.scales.shape, self.shape)
        assert self.offsets is None or self.offsets.shape == self.scales.shape

    @property
    def shape(self) -> tuple[int, int]:
        n, cols = self.qweight.shape
        return n, cols * 2 if self.bits == 4 else cols

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.qweight.nbytes + self.scales.nbytes + extra

    def values(self) -> torch.Tensor:
        """(N, K) integer values: uint8 for 4-bit, int8 for 8-bit."""
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None
                   ) -> torch.Tensor:
        rows = rows or slice(None)
        q = (unpack_int4(self.qweight[rows]) if self.bits == 4 else self.qweight[rows]).float()
        n, k = q.shape
        g = self.group_size
        w = q.view(n, k // g, g) * self.scales[rows].float()[:, :, None]  # (N, K/g, g)
        if self.offsets is not None:
            w = w + self.offsets[rows].float()[:, :, None]
        return w.view(n, k).to(dtype)

    def dequantize_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """(N, len(cols)) fp32 columns, unpacking only the bytes that hold them."""
        if self.bits == 4:
            q = (self.qweight[:, cols // 2] >> ((cols % 2) * 4).to(torch.uint8)) & 0x0F
        else:
            q = self.qweight[:, cols]
        groups = cols // self.group_size
        w = q.float() * self.scales[:, groups].float()
        if self.offsets is not None:
            w = w + self.offsets[:, groups].float()
        return w

    def to_int8_per_channel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-round onto one symmetric int8 grid per row (what fbgemm executes).

        Adds at most half an int8 step (max|row| / 254) of error per weight on top of the groups'
        own rounding. Done in row chunks so no full fp32 copy of the matrix ever exists.
        """
        n, _ = self.shape
        qs, scales = [], []
        for start in range(0, n, _ROW_CHUNK):
            q, s = quantize_int8_per_channel(self.dequantize(rows=slice(start, start + _ROW_CHUNK)))
            qs.append(q)
            scales.append(s)
        return torch.cat(qs), torch.cat(scales)

    def take(self, part: WeightSlice) -> GroupWeights:
        """The rows and columns of `part`, exactly (no value is re-rounded): rows are whole, and
        the column range must start and end on group boundaries (ValueError if not)."""
        n, k = self.shape
        g = self.group_size
        if part.cols.start % g or part.cols.stop % g or part.cols.stop > k:
            raise ValueError(f"columns {part.cols.start}..{part.cols.stop} of a {n}x{k} matrix "
                             f"do not fall on its {g}-column quantization groups")
        per_byte = 2 if self.bits == 4 else 1
        groups = slice(part.cols.start // g, part.cols.stop // g)
        q = part.take_rows(self.qweight)[:, part.cols.start // per_byte:part.cols.stop // per_byte]
        offsets = None if self.offsets is None else part.take_rows(self.offsets)[:, groups]
        return GroupWeights(q.contiguous(), part.take_rows(self.scales)[:, groups].contiguous(),
                            None if offsets is None else offsets.contiguous(), g, self.bits)

    def permute_rows(self, order: torch.Tensor) -> GroupWeights:
        """Rows reordered; exact, since every group lies within one row."""
        offsets = None if self.offsets is None else self.offsets[order]
        return GroupWeights(self.qweight[order], self.scales[order], offsets,
                            self.group_size, self.bits)

    def with_group_size(self, group_size: int) -> GroupWeights:
        """The same weights described with smaller groups (each group's scale repeated)."""
        assert self.group_size % group_size == 0
        rep = self.group_size // group_size
        offsets = None if self.offsets is None else self.offsets.repeat_interleave(rep, dim=1)
        return GroupWeights(self.qweight, self.scales.repeat_interleave(rep, dim=1), offsets,
                            group_size, self.bits)


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> GroupWeights:
    """Asymmetric 4-bit per group: scale = (max - min) / 15, offset = min, q in 0..15.

    Scales and offsets are stored in fp16 and the values are rounded against the fp16-rounded
    scale and offset, so `dequantize` reproduces exactly what the rounding aimed at.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scales = ((hi - lo) / 15.0).clamp_min(1e-8).half()
    offsets = lo.half()
    q = torch.round((wg - offsets.float()[:, :, None]) / scales.float()[:, :, None])
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return GroupWeights(pack_int4(q), scales, offsets, group_size, bits=4)


def cat_rows(parts: list[GroupWeights]) -> GroupWeights:
    """Stack matrices with the same input dimension (fusing q,k,v or gate,up), exactly."""
    group = min(p.group_size for p in parts)
    parts = [p.with_group_size(group) if p.group_size != group else p for p in parts]
    if len({p.bits for p in parts}) > 1:  # widen 4-bit parts to int8 (values 0..15 fit)
        parts = [_widen(p) for p in parts]
    dtype = torch.float32 if any(p.scales.dtype == torch.float32 for p in parts) else torch.float16
    has_offsets = any(p.offsets is not None for p in parts)
    offsets = None
    if has_offsets:
        offsets = torch.cat([(p.offsets if p.offsets is not None else torch.zeros_like(p.scales))
                             .to(dtype) for p in parts])
    return GroupWeights(torch.cat([p.qweight for p in parts]),
                        torch.cat([p.scales.to(dtype) for p in parts]),
                        offsets, group, parts[0].bits)


def _widen(p: GroupWeights) -> GroupWeights:
    if p.bits == 8:
        return p
    return GroupWeights(unpack_int4(p.qweight).to(torch.int8), p.scales, p.offsets,
                        p.group_size, bits=8)
