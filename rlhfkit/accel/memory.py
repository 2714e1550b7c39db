"""Process memory on CPU: giving freed memory back to the operating system between stages
(``release_memory``), keeping freed blocks for reuse inside a stage (``reuse_freed_memory``),
and measuring the resident size (``rss_mb``). glibc-specific; no-ops elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def release_memory() -> None:
    """Give freed memory back to the operating system: Python's garbage collector, then glibc's
    ``malloc_trim(0)``.

    Why: on a CPU, tensors of ever-changing shapes (rollouts of varying length, micro-batches)
    are allocated and freed all the time, and glibc keeps freed heap pages in the process's
    resident memory until it is asked to give them back, so PPO's resident size between iterations
    doubled and kept growing (benchmarks/ppo_memory.py; the peak inside an iteration is the same
    either way). Called between the pipeline's stages (which share one process) and by PPO when its
    resident size grew (see ``reuse_freed_memory``). Costs milliseconds; a no-op without glibc.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation instead of unmapping it at once.

    Why: by default glibc serves every allocation above 32 MB with its own ``mmap`` and unmaps it
    on free. A training step on CPU allocates and frees such tensors all the time — the tied
    embedding's gradient, the LM head's logits over the vocabulary, autocast's bf16 weight copies —
    so each step page-faults and zero-fills hundreds of MB afresh. With ``M_MMAP_MAX = 0`` (every
    block from the heap) and no automatic trimming, freed blocks are reused: training steps run
    faster at about the same peak memory (docs/performance.md). ``release_memory`` (``malloc_trim``) still
    hands the free pages back between pipeline stages, and in PPO when the resident size grew.

    Process-wide and idempotent; called by every training stage on CPU (``make_accelerator``).
    ``RLHFKIT_MALLOC=default`` keeps glibc's behaviour; a no-op without glibc. Returns whether it
    changed anything.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt") or os.environ.get("RLHFKIT_MALLOC", "") == "default":
        return False
    return bool(_LIBC.mallopt(_M_MMAP_MAX, 0)) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB (Linux; peak only elsewhere)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        return now, max(peak, now)  # the kernel's peak can lag the current count by a page or two
    except (OSError, ValueError, IndexError):
        return float("nan"), peak
