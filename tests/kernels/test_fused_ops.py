"""The fused elementwise kernels (kernels/csrc/fused_ops.cpp) in every ISA flavour this CPU runs,
against the torch expressions they replace: RoPE + cache write and the residual add bit for bit,
RMSNorm and SiLU * up to fp32 rounding; every row the same alone as in any batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.kv_cache.kv_store import DenseKVStore
from pagoda.layers.fused_ops import FusedOps
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding


def ops_of(flavour: str) -> FusedOps:
    ops = FusedOps.load(flavour)
    assert ops is not None
    return ops


def norm(hidden: int, offset: float = 0.0) -> RMSNorm:
    n = RMSNorm(hidden, 1e-5, offset)
    with torch.no_grad():
        n.weight.copy_(torch.randn(hidden) * 0.1 + 1.0)
    return n


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_residual_add(flavour: str, offset: float):
    torch.manual_seed(0)
    ops, n = ops_of(flavour), norm(576, offset)
    x, delta = torch.randn(37, 576) * 3, torch.randn(37, 576)
    with torch.inference_mode():
        torch.testing.assert_close(ops.rms_norm(x, n), n(x), rtol=2e-6, atol=1e-6)
        total, normed = ops.add_rms_norm(x, delta, n)
        assert torch.equal(total, x + delta)
        torch.testing.assert_close(normed, n(x + delta), rtol=2e-6, atol=1e-6)


def test_rms_norm_of_a_zero_row_and_odd_widths(flavour: str):
    ops = ops_of(flavour)
    for hidden in (1, 15, 17, 100):
        n = norm(hidden)
        x = torch.randn(3, hidden)
        x[1] = 0
        with torch.inference_mode():
            torch.testing.assert_close(ops.rms_norm(x, n), n(x), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_write_equals_torch_rope_and_store_write(flavour: str, kv_dtype: torch.dtype):
    """Bit for bit, the cache's rounding to fp16 / bf16 included."""
    torch.manual_seed(1)
    heads, kv_heads, hd, tokens = 9, 3, 64, 11
    rope = RotaryEmbedding(hd, 512, 10000.0)
    store = DenseKVStore(8, 16, kv_heads, hd, torch.device("cpu"), kv_dtype, torch.float32)
    want_store = DenseKVStore(8, 16, kv_heads, hd, torch.device("cpu"), kv_dtype, torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * hd)
    positions = torch.tensor([0, 1, 2, 5, 100, 101, 200, 300, 400, 510, 511])
    slots = torch.randperm(8 * 16)[:tokens]
    q, k, v = qkv.clone().split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    want_q, want_k = rope(positions, q.reshape(tokens, heads, hd), k.reshape(tokens, kv_heads, hd))
    want_store.write(slots, want_k, v.reshape(tokens, kv_heads, hd))
    assert ops_of(flavour).rope_write(qkv, positions, rope, heads, kv_heads, store, slots)
    got_q, got_k, got_v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    assert torch.equal(got_q.reshape(tokens, heads, hd), want_q)
    assert torch.equal(got_k.reshape(tokens, kv_heads, hd), want_k)
    assert torch.equal(got_v, v)
    assert torch.equal(store.k, want_store.k) and torch.equal(store.v, want_store.v)


def test_rope_write_refuses_bad_positions_and_slots(flavour: str):
    rope = RotaryEmbedding(64, 32, 10000.0)
    store = DenseKVStore(2, 16, 1, 64, torch.device("cpu"), torch.float32, torch.float32)
    qkv = torch.randn(1, 3 * 64)
    ops = ops_of(flavour)
    with pytest.raises(RuntimeError, match="position out of range"):
        ops.rope_write(qkv, torch.tensor([32]), rope, 1, 1, store, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_write(qkv, torch.tensor([0]), rope, 1, 1, store, torch.tensor([32]))


def test_silu_mul(flavour: str):
    torch.manual_seed(2)
    gate_up = torch.randn(19, 2 * 1536) * 4
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    got = ops_of(flavour).silu_mul(gate_up)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=4e-6, atol=1e-6)


def test_every_row_is_the_same_alone_and_in_a_batch(flavour: str):
    torch.manual_seed(3)
    ops, n = ops_of(flavour), norm(576)
    x, delta = torch.randn(64, 576), torch.randn(64, 576)
    gate_up = torch.randn(64, 2 * 1536)
    batch = (ops.rms_norm(x, n), ops.add_rms_norm(x, delta, n)[1], ops.silu_mul(gate_up))
    for row in (0, 5, 63):
        alone = (ops.rms_norm(x[row:row + 1], n), ops.add_rms_norm(
            x[row:row + 1], delta[row:row + 1], n)[1], ops.silu_mul(gate_up[row:row + 1]))
        for b, a in zip(batch, alone, strict=True):
            assert torch.equal(b[row:row + 1], a)


def test_flavours_compute_the_same_numbers():
    """The lane order of every sum is fixed in the source, so the ISA flavours agree exactly."""
    from pagoda.kernels import build

    runnable = build.runnable_flavours()
    if len(runnable) < 2:
        pytest.skip(f"only the {runnable} flavour runs on this CPU: nothing to compare")
    torch.manual_seed(4)
    n, x, gate_up = norm(576), torch.randn(9, 576), torch.randn(9, 2 * 1536)
    results = [(ops_of(f).rms_norm(x, n), ops_of(f).silu_mul(gate_up)) for f in runnable]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
