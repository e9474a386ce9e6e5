"""The paged decode-attention kernels against SDPA over the same context, gathered by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.layers.decode_backend import select_decode_kernel


def reference(q, k_blocks, v_blocks, tables, lens, scale, window):
    out = torch.empty_like(q)
    block_size = k_blocks.shape[1]
    for d in range(q.shape[0]):
        n = int(lens[d])
        k = k_blocks[tables[d]].flatten(0, 1)[:n]  # (n, kvh, hd)
        v = v_blocks[tables[d]].flatten(0, 1)[:n]
        if window:
            k, v = k[max(0, n - window):], v[max(0, n - window):]
        o = F.scaled_dot_product_attention(q[d][:, None], k.transpose(0, 1), v.transpose(0, 1),
                                           scale=scale, enable_gqa=True)
        out[d] = o[:, 0]
    assert block_size > 0
    return out


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("window", [None, 37])
def test_kernel_matches_sdpa(backend, window):
    torch.manual_seed(0)
    num_blocks, block_size, kvh, hd, heads = 64, 16, 3, 64, 9
    k_blocks = torch.randn(num_blocks, block_size, kvh, hd)
    v_blocks = torch.randn(num_blocks, block_size, kvh, hd)
    lens = torch.tensor([1, 16, 17, 100, 160])  # one token, a full block, one past, longer
    tables = torch.stack([torch.randperm(num_blocks)[:10] for _ in lens])
    q = torch.randn(len(lens), heads, hd)
    kernel = select_decode_kernel(backend, "cpu")
    assert kernel is not None
    got = kernel(q, k_blocks, v_blocks, tables, lens, 0.125, window)
    want = reference(q, k_blocks, v_blocks, tables, lens, 0.125, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_selects_the_cpp_kernel_on_cpu_and_none_elsewhere():
    from pagoda.layers import paged_decode_cpp

    assert select_decode_kernel("auto", "cpu") is paged_decode_cpp.paged_decode_attention
    assert select_decode_kernel("auto", "cuda") is None
    assert select_decode_kernel("torch", "cpu") is None
    with pytest.raises(ValueError):
        select_decode_kernel("flash", "cpu")
