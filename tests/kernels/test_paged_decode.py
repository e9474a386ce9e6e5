"""The paged decode-attention kernel in every ISA flavour this CPU runs, against SDPA."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.paged_decode_cpp import paged_decode_attention
from tests.engine.test_decode_kernels import reference


@pytest.mark.parametrize("window", [None, 37])
def test_flavour_matches_sdpa(flavour: str, window: int | None):
    torch.manual_seed(0)
    num_blocks, block_size, kvh, hd, heads = 64, 16, 3, 64, 9
    k_blocks = torch.randn(num_blocks, block_size, kvh, hd)
    v_blocks = torch.randn(num_blocks, block_size, kvh, hd)
    lens = torch.tensor([1, 16, 17, 100, 160])
    tables = torch.stack([torch.randperm(num_blocks)[:10] for _ in lens])
    q = torch.randn(len(lens), heads, hd)
    got = paged_decode_attention(q, k_blocks, v_blocks, tables, lens, 0.125, window,
                                 flavour=flavour)
    want = reference(q, k_blocks, v_blocks, tables, lens, 0.125, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
