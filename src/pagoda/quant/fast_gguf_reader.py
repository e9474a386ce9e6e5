"""gguf-py's `GGUFReader`, with its metadata arrays parsed in one pass instead of per element.

gguf-py builds every metadata field element by element through recursive calls, each slicing the
`np.memmap` (a slow `__getitem__`): a vocabulary of 49k tokens (SmolLM2) took 5.6 s to open and
Gemma 3's 262k took 29 s — most of a model's load time, paid by every `pagoda serve` start.
This subclass keeps gguf-py's parsing and its data model (the same `fields`, `parts`, `data`
indexes and `types`, the same `tensors`; consumers cannot tell the difference, which
tests/quant/test_fast_gguf_reader.py checks field by field against gguf-py's reader) and
changes only how it gets there:
  * slices come from a plain ndarray view of the memory map (no memmap subclass overhead);
  * an array of numbers is read as one view and split into gguf-py's one-element parts;
  * an array of strings is walked with `struct` over the mapped bytes, two views per string.
Files in the other byte order, and nested arrays, take gguf-py's own path.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType
from gguf.gguf_reader import GGUFReader

_U64 = struct.Struct("<Q")


class FastGGUFReader(GGUFReader):
    def _get(self, offset: int, dtype: Any, count: int = 1,
             override_order: Any = None) -> np.ndarray:
        flat = self.__dict__.get("_flat")
        if flat is None or flat.base is not self.data:  # the map is created by GGUFReader
            flat = self._flat = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = flat[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int
                         ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        gtype = GGUFValueType(raw_type)
        if gtype != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = GGUFValueType(raw_itype[0]), int(alen[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        types = [gtype] + ([itype] if n else [])
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, n)
            parts += [values[i:i + 1] for i in range(n)]
            return 12 + int(values.nbytes), parts, list(range(2, 2 + n)), types
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)  # nested arrays
        flat = self._flat
        raw = memoryview(flat)
        data_idxs = []
        for _ in range(n):
            length = _U64.unpack_from(raw, offs)[0]
            parts.append(flat[offs:offs + 8].view(np.uint64))
            parts.append(flat[offs + 8:offs + 8 + length])
            data_idxs.append(len(parts) - 1)
            offs += 8 + length
        return offs - orig_offs, parts, data_idxs, types
