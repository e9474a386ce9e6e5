"""fp32 linears on oneDNN (layers/dense_linear.py): the same product as torch's, and a bounded
set of row counts reaching oneDNN, whose per-shape primitive cache otherwise fills and churns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.layers.dense_linear import EXACT_ROWS, PackedLinear, onednn_available, onednn_rows

if not onednn_available():
    pytest.skip("this torch build has no oneDNN linear", allow_module_level=True)


def test_row_counts_reaching_onednn_are_bounded():
    seen = {onednn_rows(n) for n in range(1, 8193)}
    assert len(seen) <= EXACT_ROWS + 8192 // 64
    assert all(onednn_rows(n) == n for n in range(1, EXACT_ROWS + 1))  # decode rows: exact
    assert all(n <= onednn_rows(n) < n + 64 for n in range(1, 8193))


@pytest.mark.parametrize("num_rows", [1, 7, 128, 129, 200, 1000])
def test_padded_products_match_torch(num_rows):
    torch.manual_seed(num_rows)
    linear = nn.Linear(96, 160, bias=False)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(2, num_rows, 96)
    with torch.inference_mode():
        got, want = packed(x), linear(x)
    assert got.shape == want.shape == (2, num_rows, 160)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
