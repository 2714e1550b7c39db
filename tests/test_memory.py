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
