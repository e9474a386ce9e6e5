"""kernels/huge_pages.py: tensors moved into one mapping in 2 MiB pages keep their objects and
their bits; tensors that cannot move alone (views, strided, small) stay where they are."""

from __future__ import annotations

import gc

import pytest
import torch

from pagoda.kernels import huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.available(),
                               reason="transparent huge pages are off here (Linux 'never', or "
                               "not Linux): settle moves nothing by design")


def mapping_of(address: int) -> dict[str, int] | None:
    """The /proc/self/smaps fields (kB) of the mapping holding `address`, None if unmapped."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if found is not None:
                    break
                if lo <= address < hi:
                    found = {"start": lo, "end": hi}
            elif found is not None and head.endswith(":") and line.split()[1].isdigit():
                found[head[:-1]] = int(line.split()[1])
    return found


def huge_kib(t: torch.Tensor) -> int:
    m = mapping_of(t.data_ptr())
    return 0 if m is None else m.get("AnonHugePages", 0)


@needs_thp
def test_settle_moves_tensors_into_huge_pages_keeping_objects_and_bits():
    ts = [torch.randn(1024, 1024), torch.randint(0, 255, (3 << 20,), dtype=torch.uint8),
          torch.randn(700, 513).half()]
    before = [t.clone() for t in ts]
    objects = [id(t) for t in ts]
    moved = huge_pages.settle([*ts, ts[0]])  # listed twice, moved once
    sizes = [t.numel() * t.element_size() for t in ts]
    assert sum(sizes) <= moved < sum(sizes) + 64 * len(ts)
    assert [id(t) for t in ts] == objects
    for t, old in zip(ts, before, strict=True):
        assert torch.equal(t, old)
        assert t.data_ptr() % huge_pages.ALIGN == 0
    # one mapping, in the order given, in huge pages
    assert ts[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    assert ts[0].data_ptr() < ts[1].data_ptr() < ts[2].data_ptr()
    assert mapping_of(ts[0].data_ptr())["start"] == mapping_of(ts[2].data_ptr())["start"]
    assert huge_kib(ts[0]) >= 2048
    # they now share one storage, so a second settle leaves them alone
    assert huge_pages.settle(ts) == 0
    ts[1].add_(1)  # still ordinary writable tensors
    assert torch.equal(ts[1], before[1] + 1)


@needs_thp
def test_views_strided_and_small_tensors_stay_put():
    base = torch.randn(1024, 1024)
    view, strided, small = base[:512], torch.randn(1024, 1024).T, torch.randn(1000)
    offset = torch.randn(1024, 1024)[1:]  # a view not at its storage's start
    ptrs = [t.data_ptr() for t in (view, strided, small, offset)]
    assert huge_pages.settle([view, strided, small, offset]) == 0
    assert [t.data_ptr() for t in (view, strided, small, offset)] == ptrs


@needs_thp
def test_mapping_lives_while_any_moved_tensor_does():
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    huge_pages.settle([a, b])
    address = b.data_ptr()
    del a
    gc.collect()
    assert mapping_of(address) is not None and torch.isfinite(b).all()
    del b
    gc.collect()
    assert mapping_of(address) is None


@needs_thp
def test_inference_tensors_move():
    with torch.inference_mode():
        t = torch.randn(1024, 512)
    old = t.clone()
    assert huge_pages.settle([t]) > 0
    assert torch.equal(t, old)
