"""The paged decode-attention kernel in every ISA flavour this CPU runs, against SDPA, over fp32,
fp16 and bf16 caches and head sizes that take the vector path (multiples of 8) and the plain one."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels import build
from pagoda.layers.paged_decode_cpp import paged_decode_attention
from tests.engine.test_decode_kernels import reference

# lengths: one token, a full block, one past, longer, and not a multiple of 8; then contexts
# attended in chunks (the kernel's kChunk = 512 rows): a last chunk of one row, several chunks, and
# two whole chunks
SHORT = [1, 16, 17, 100, 160, 83]
LONG = [513, 600, 1000, 1024]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 37, 300])
@pytest.mark.parametrize("head_dim", [64, 256, 36])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: most weights underflow to exactly 0
@pytest.mark.parametrize("lengths", [SHORT, LONG], ids=["short", "chunked"])
def test_flavour_matches_sdpa(flavour: str, window: int | None, kv_dtype: torch.dtype,
                              head_dim: int, spread: float, lengths: list[int]):
    torch.manual_seed(0)
    num_blocks, block_size, kvh, heads = 64, 16, 3, 9
    lens = torch.tensor(lengths)
    k_blocks = torch.randn(num_blocks, block_size, kvh, head_dim).to(kv_dtype)
    v_blocks = torch.randn(num_blocks, block_size, kvh, head_dim).to(kv_dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:-(-max(lengths) // block_size)]
                          for _ in lens])
    q = spread * torch.randn(len(lens), heads, head_dim)
    got = paged_decode_attention(q, k_blocks, v_blocks, tables, lens, head_dim ** -0.5, window,
                                 flavour=flavour)
    # the reference reads the same stored values, widened to fp32
    want = reference(q, k_blocks.float(), v_blocks.float(), tables, lens, head_dim ** -0.5,
                     window)
    torch.testing.assert_close(got, want, atol=1e-5 * spread, rtol=1e-5)


def test_refuses_an_int8_cache(flavour: str):
    k = torch.zeros(4, 16, 3, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16 cache"):
        paged_decode_attention(torch.zeros(1, 9, 64), k, k, torch.zeros(1, 1, dtype=torch.long),
                               torch.ones(1, dtype=torch.long), 0.125, None, flavour=flavour)


@pytest.mark.parametrize("head_dim", [64, 36])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_a_request_gives_the_same_bits_alone_and_in_a_batch(flavour: str, head_dim: int,
                                                             kv_heads: int):
    """A request's attention alone and in a batch, on 1, 2 and 4 threads (tasks are split over
    threads differently), with contexts of one chunk and of several: its bits must not change
    (batch invariance)."""
    torch.manual_seed(1)
    num_blocks, block_size, kvh, heads = 64, 16, kv_heads, 3 * kv_heads
    lens = torch.tensor([100, 7, 700, 33])
    k_blocks = torch.randn(num_blocks, block_size, kvh, head_dim)
    v_blocks = torch.randn(num_blocks, block_size, kvh, head_dim)
    tables = torch.stack([torch.randperm(num_blocks)[:44] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim)

    def attend(rows: slice) -> torch.Tensor:
        return paged_decode_attention(q[rows], k_blocks, v_blocks, tables[rows], lens[rows],
                                      head_dim ** -0.5, None, flavour=flavour)

    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            batch = attend(slice(0, 4))
            for i in range(4):
                alone = attend(slice(i, i + 1))[0]
                assert torch.equal(alone, batch[i]), f"request {i}, {n} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 256, 40])
def test_vector_flavours_agree_bit_for_bit(kv_dtype: torch.dtype, head_dim: int):
    """avx2 and avx512 return the same bits (the avx512 weighted sum runs 16-lane vectors, the
    scores stay 8-lane): a model's greedy answer must not depend on which kind of CPU runs it.
    Decode rows, chunked contexts and the rows of one prefill."""
    for name in ("avx2", "avx512"):
        if not build.can_run(name):
            pytest.skip(f"this CPU cannot run the {name} flavour (lacks "
                        f"{', '.join(build.missing_flags(name))})")
    torch.manual_seed(2)
    num_blocks, block_size, kvh, heads = 160, 16, 3, 9
    lens = torch.tensor(SHORT + LONG + list(range(1500, 1510)))
    k_blocks = torch.randn(num_blocks, block_size, kvh, head_dim).to(kv_dtype)
    v_blocks = torch.randn(num_blocks, block_size, kvh, head_dim).to(kv_dtype)
    tables = torch.randperm(num_blocks)[:-(-int(lens.max()) // block_size)].repeat(len(lens), 1)
    q = 4 * torch.randn(len(lens), heads, head_dim)
    got = [paged_decode_attention(q, k_blocks, v_blocks, tables, lens, head_dim ** -0.5, None,
                                  flavour=name) for name in ("avx2", "avx512")]
    assert torch.equal(got[0], got[1])
