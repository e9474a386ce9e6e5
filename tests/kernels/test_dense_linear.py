"""fp32 linears on oneDNN (layers/dense_linear.py): the same product as torch's, and a bounded
set of row counts reaching oneDNN, whose per-shape primitive cache otherwise fills and churns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pagoda.kernels import build
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


# Run in a fresh interpreter, since the ISA caps must be set before torch loads: for SmolLM2's
# qkv and down projections (the down projection's K = 1536 is where oneDNN's AVX-512 single-row
# kernel rounded differently), the row counts whose first row differs from the same row
# computed among four.
ROW_CHECK = """
import json, torch
from pagoda.kernels import build
from pagoda.layers.dense_linear import PackedLinear
torch.manual_seed(0)
differ = []
for k, n in ((576, 960), (1536, 576)):
    packed = PackedLinear.from_linear(torch.nn.Linear(k, n, bias=False))
    x = torch.randn(200, k)
    with torch.inference_mode():
        ref = packed(x[:4])[0]
        differ += [(k, m) for m in [*range(1, 17), 100, 129, 200]
                   if not torch.equal(packed(x[:m])[0], ref)]
print(json.dumps(differ))
"""
CAPS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


@pytest.mark.parametrize("isa", sorted(CAPS))
def test_a_row_has_the_same_bits_at_every_row_count(isa):
    """A request's logits must not depend on how many rows its batch has: fp32 linears give a
    row the same bits at every row count, with oneDNN's native kernels and capped at AVX2."""
    if isa == "avx2" and not {"avx2", "fma"} <= build.cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA: oneDNN's AVX2 kernels cannot run")
    env = {**os.environ, "OMP_NUM_THREADS": "2", **CAPS[isa]}
    out = subprocess.run([sys.executable, "-c", ROW_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []
