"""Storage of one layer's K/V in slots (slot = block_id * block_size + offset).

`KVStore` is the interface attention uses; the dtype variants differ only in how they encode.
Reads gather whole blocks (block_size contiguous tokens), which copies several times faster than
gathering token by token. int8 keeps one fp32 scale per (token, kv head): symmetric absmax.
"""

from __future__ import annotations

import torch

KV_DTYPES = ("fp32", "fp16", "bf16", "int8")


def kv_bytes_per_element(kv_dtype: str, head_dim: int) -> float:
    """Bytes per K or V element, scales included."""
    return {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / head_dim}[kv_dtype]


class KVStore:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.shape = (num_blocks * block_size, num_kv_heads, head_dim)  # slot-major
        self.device = device

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: (len(block_ids) * block_size, n_kv, hd), compute dtype."""
        raise NotImplementedError

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(self.num_blocks, self.block_size, *x.shape[1:])

    def cpu_blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(num_blocks, block_size, n_kv, hd) K and V views when kept in a float dtype (fp32,
        fp16, bf16) on the CPU: what the C++ kernels read and write in place."""
        return None


class DenseKVStore(KVStore):
    """K/V kept in a float dtype; gathered values are cast back to the compute dtype."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype):
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, device)
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self.compute_dtype = compute_dtype

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(0, slots, k.to(self.k.dtype))
        self.v.index_copy_(0, slots, v.to(self.v.dtype))

    def cpu_blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.k.device.type == "cpu":
            return self._blocks(self.k), self._blocks(self.v)
        return None

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._blocks(self.k).index_select(0, block_ids).flatten(0, 1)
        v = self._blocks(self.v).index_select(0, block_ids).flatten(0, 1)
        return k.to(self.compute_dtype), v.to(self.compute_dtype)


class Int8KVStore(KVStore):
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, compute_dtype: torch.dtype):
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, device)
        self.k = torch.zeros(self.shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(self.shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(self.shape[:2] + (1,), dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(self.shape[:2] + (1,), dtype=torch.float32, device=device)
        self.compute_dtype = compute_dtype

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
        q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        qk, sk = self._quantize(k)
        qv, sv = self._quantize(v)
        self.k.index_copy_(0, slots, qk)
        self.v.index_copy_(0, slots, qv)
        self.k_scale.index_copy_(0, slots, sk)
        self.v_scale.index_copy_(0, slots, sv)

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def read(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            values = self._blocks(q).index_select(0, block_ids).flatten(0, 1).float()
            return values * self._blocks(scale).index_select(0, block_ids).flatten(0, 1)

        return (read(self.k, self.k_scale).to(self.compute_dtype),
                read(self.v, self.v_scale).to(self.compute_dtype))


def make_kv_store(kv_dtype: str, num_blocks: int, block_size: int, num_kv_heads: int,
                  head_dim: int, device: torch.device, compute_dtype: torch.dtype) -> KVStore:
    if kv_dtype == "int8":
        return Int8KVStore(num_blocks, block_size, num_kv_heads, head_dim, device, compute_dtype)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if kv_dtype not in dtypes:
        raise ValueError(f"unknown kv cache dtype {kv_dtype!r}; choose from {KV_DTYPES}")
    return DenseKVStore(num_blocks, block_size, num_kv_heads, head_dim, device, dtypes[kv_dtype],
                        compute_dtype)
