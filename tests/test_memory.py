"""release_memory gives freed heap memory back to the OS; rss_mb reads it."""

from __future__ import annotations

import gc

import pytest
import torch

from rlhfkit.recipes import common
from rlhfkit.recipes.common import release_memory, rss_mb


@pytest.mark.skipif(common._LIBC is None, reason="malloc_trim is glibc's; this C library has none")
def test_release_memory_returns_freed_heap_pages():
    # 100 KB tensors come from the heap (below glibc's mmap threshold); keeping every other one
    # alive leaves the freed ones as holes that glibc keeps resident until malloc_trim
    keep, free = [], []
    for i in range(4000):
        (keep if i % 2 else free).append(torch.ones(25_000))
    del free
    gc.collect()
    held, peak = rss_mb()
    assert 0 < held <= peak
    release_memory()
    after, _ = rss_mb()
    assert held - after > 100, (held, after)  # ~200 MB were freed; at least half goes back at once
    assert all(float(t[0]) == 1.0 for t in keep[:10])  # live tensors are untouched


@pytest.mark.skipif(common._LIBC is None, reason="mallopt is glibc's; this C library has none")
def test_reuse_freed_memory_serves_a_big_tensor_again_without_page_faults():
    import resource

    assert common.reuse_freed_memory()

    def faults_of_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(30_000_000)  # 120 MB: above glibc's largest mmap threshold
        t.fill_(1.0)  # touch every page
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert float(t[-1]) == 1.0
        del t
        return after - before

    faults_of_one_allocation()  # the first ones fault their pages in (the heap grows to fit)
    faults_of_one_allocation()
    again = sorted(faults_of_one_allocation() for _ in range(5))
    # glibc's default unmaps the block on free: every allocation would fault all ~29,000 4 KB
    # pages again (~60 with 2 MB huge pages). Kept in the heap, the block is reused; a small
    # allocation landing in front of it can still push one re-allocation past the heap's end
    assert again[2] < 50, again


def test_reuse_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RLHFKIT_MALLOC", "default")
    assert common.reuse_freed_memory() is False
