"""A C++ decode-attention kernel for the bf16 CPU fast path, compiled on first use.

What it computes, for every decode row b and query head h (one new query per row):

    out[b, h] = softmax(q[b, h] · K[b, g]ᵀ · scale)[: n[b]] · V[b, g][: n[b]]      g = h // (H / Hkv)

with K, V the preallocated cache ``(S, Hkv, L, D)`` in bf16, ``n[b]`` the number of valid
positions of row b (its length including the token just written), scores, softmax (max-subtracted)
and the weighted sum in fp32, the output rounded once to bf16. This is SDPA with one query per head,
grouped-query heads sharing a kv head (``enable_gqa``) and a per-row key-length mask, without the
mask: each row only reads its own ``n[b]`` positions.

Why: at one query per head SDPA was ~40 % of a decode step, paying a setup per (row, head) and
blocking queries for many-row matrices; here each task (a row, or a group of rows, and a kv head)
streams its keys once for all its query heads, then its values once, prefetching ahead.

Prompt prefixes read once per group (``PrefixGroups``): the K samples of a prompt sit in K slots
holding identical copies of the prompt's keys/values (one prefill, copied; SDPA, compaction and
refills need nothing new). One task per (group, kv head) reads the shared positions once, from the
group's first row, then each row's own positions, with the softmax over the union
(``attend_group``). The shared length is rounded down to the 16-key blocks of the score loop, so the
output is bitwise that of unshared decoding (tested); only the reads change. A row refilled with a
new prompt starts a new group and never touches a prefix its old group still reads.

The same extension holds the rest of a fused bf16 decode step (``Runner._decode_fused``): RoPE +
cache write + attention (``rope_cache_attention``), residual add + RMSNorm (``add_rms_norm``) and
SiLU·up (``silu_mul``), each replacing 3–6 small PyTorch ops per layer, with HF's bf16 roundings
done in integer arithmetic (``f2bf16``) so that they vectorise exactly: bitwise the outputs of the
scalar loops. Measurements: see docs/performance.md.

How it is built and when it is used: the source, ``attention_cpu.cpp`` beside this file, is compiled with
``torch.utils.cpp_extension.load_inline`` (g++ -O3 -march=native; AVX-512 intrinsics when the
compiler targets them, a plain loop otherwise) into ``$RLHFKIT_CACHE/torch_extensions/``, in a
directory named after a hash of the source, the flags, the CPU's model and flags and the torch and
Python versions — so a build is reused by every later process on the same machine and rebuilt on
another CPU. Nothing depends on it: ``decode_attention`` returns ``None`` (and the caller uses SDPA)
when the tensors are not CPU bf16 of the supported shapes, when ``RLHFKIT_DECODE_KERNEL=0``, or
when the build failed (no compiler, no ninja, a compile error) — logged once (INFO), never raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

# The C++ source: attention_cpu.cpp beside this file (shipped as package data).
_SOURCE = Path(__file__).with_name("attention_cpu.cpp").read_text()

_FLAGS = ["-O3", "-march=native", "-std=c++17"]
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_lock = threading.Lock()
_module = None  # the loaded extension, False once a build failed
build_seconds: float | None = None  # wall time of the build (or of loading a cached one) in this process
built_now: bool = False  # True when this process compiled it (not found in the cache)


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (a -march=native build only runs where it was built)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [x for x in lines if x.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def build_dir() -> Path:
    from rlhfkit.models.loading import cache_dir

    key = "\n".join([_SOURCE, " ".join(_FLAGS), _cpu_signature(), torch.__version__, sys.version])
    return cache_dir() / "torch_extensions" / f"decode_attention_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def enabled() -> bool:
    return os.environ.get("RLHFKIT_DECODE_KERNEL", "1") != "0"


def load():
    """The compiled extension (built on first use, then cached), or None if unavailable."""
    global _module, build_seconds, built_now
    if _module is not None:
        return _module or None
    with _lock:
        if _module is not None:
            return _module or None
        if not enabled():
            log.info("decode-attention kernel disabled (RLHFKIT_DECODE_KERNEL=0): using SDPA")
            _module = False
            return None
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load_inline

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            built_now = not any(d.glob("*.so"))
            if built_now:
                log.info("compiling the decode-attention kernel once into %s (about a minute)", d)
            _module = load_inline(
                name="rlhfkit_decode_attention",
                cpp_sources=[_SOURCE],
                functions=["decode_attention", "rope_cache_attention", "add_rms_norm", "silu_mul", "exp_block_sums"],
                extra_cflags=_FLAGS,
                build_directory=str(d),
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, a compile error: SDPA it is
            log.info("decode-attention kernel unavailable, using SDPA: %s", str(e).strip().splitlines()[-1:])
            _module = False
        build_seconds = time.perf_counter() - t0
        return _module or None


def ready(k_cache: torch.Tensor, n_heads: int) -> bool:
    """Whether the kernel runs for this cache (CPU, bf16, a supported head dim, not disabled),
    building or loading it on the first call of the process."""
    ok = (
        enabled()
        and _module is not False
        and k_cache.device.type == "cpu"
        and k_cache.dtype == torch.bfloat16
        and k_cache.shape[-1] in SUPPORTED_HEAD_DIMS
        and n_heads % k_cache.shape[1] == 0
    )
    return ok and load() is not None


class PrefixGroups(NamedTuple):
    """Decode rows that share their first positions (the K samples of one prompt), for the kernel.

    Group g is the rows ``order[starts[g]:starts[g + 1]]``; their cache slots hold the same keys
    and values at positions ``0 .. plen[g] - 1`` (one prefill copied into each). The kernel reads
    those positions once per group, from the group's first row, rounded down to its 16-key blocks.
    Every row is in exactly one group; a row alone is a group of one. All int64 on the CPU.
    """

    order: torch.Tensor  # (B,) the rows, group by group
    starts: torch.Tensor  # (groups + 1,) where each group starts in order; starts[-1] = B
    plen: torch.Tensor  # (groups,) shared positions of each group

    @staticmethod
    def build(keys: list, plens: list[int]) -> PrefixGroups:
        """From each row's group key (rows with equal keys share) and its shared length.

        Example: keys ['a', 'b', 'a'], plens [40, 7, 40] -> order [0, 2, 1], starts [0, 2, 3],
        plen [40, 7].
        """
        members: dict = {}
        for b, key in enumerate(keys):
            members.setdefault(key, []).append(b)
        order = [b for rows in members.values() for b in rows]
        starts = [0]
        for rows in members.values():
            starts.append(starts[-1] + len(rows))
        plen = [plens[rows[0]] for rows in members.values()]
        return PrefixGroups(torch.tensor(order), torch.tensor(starts), torch.tensor(plen))

    @staticmethod
    def none(rows: int) -> PrefixGroups:
        """Every row alone: nothing shared (what the kernel did before prefix sharing)."""
        return PrefixGroups(torch.arange(rows), torch.arange(rows + 1), torch.zeros(rows, dtype=torch.long))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float,
    groups: PrefixGroups | None = None,
) -> torch.Tensor | None:
    """Attention of one query per head over each row's first ``n_valid[b]`` cached positions.

    q (B, H, 1, D) bf16 (last dim contiguous), k_cache/v_cache (S, Hkv, L, D) bf16 contiguous with
    S >= B, n_valid (B,) int64; ``groups``: rows whose slots hold the same first positions, read
    once per group (None: nothing shared; the result is bitwise the same either way). Returns
    (B, H, 1, D) bf16 — the values of ``F.scaled_dot_product_attention(q, K, V, mask, scale=scale,
    enable_gqa=True)`` with keys at offsets ``>= n_valid[b]`` masked — or None when the kernel is
    not available (see ``ready``; the caller then runs SDPA). Never raises because of the kernel's build.
    """
    if q.dtype != torch.bfloat16 or not ready(k_cache, q.shape[1]):
        return None
    g = groups if groups is not None else PrefixGroups.none(q.shape[0])
    return _module.decode_attention(q, k_cache, v_cache, n_valid, scale, *g)


# The rest of a fused decode step (runner._decode_fused); callers check ``ready`` first.


def rope_cache_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    scale: float,
    groups: PrefixGroups | None = None,
) -> torch.Tensor:
    """RoPE on q and k, the new key/value written into the caches at ``pos``, then the attention
    above over ``pos + 1`` positions. qkv (B, (H + 2·Hkv)·D) bf16: the fused projection's output;
    cos/sin_signed (L', D) bf16 (``Runner.rope_tables``); pos (B,) int64; ``groups`` as in
    ``decode_attention``. Returns (B, H·D) bf16."""
    g = groups if groups is not None else PrefixGroups.none(qkv.shape[0])
    return _module.rope_cache_attention(qkv, cos, sin_signed, pos, k_cache, v_cache, n_heads, scale, *g)


def add_rms_norm(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += r`` in place (bf16), then LLaMA's RMSNorm of h with HF's bf16 roundings: (N, d) bf16."""
    return _module.add_rms_norm(h, r, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g)·u for gate_up = [g | u] (N, 2·I) bf16 -> (N, I), rounded as HF's bf16 MLP does."""
    return _module.silu_mul(gate_up)


def available() -> bool:
    """Whether the extension is built (building or loading it now if needed) and not disabled."""
    return enabled() and _module is not False and load() is not None


def exp_block_sums(logits: torch.Tensor, t: torch.Tensor, work: torch.Tensor, block: int):
    """exp((x - max) / t) of bf16 logits (B, V) into the fp32 ``work`` buffer, in one pass per row,
    with its sums over blocks of ``block`` columns: returns (max (B, 1), block sums (B, nb))."""
    return _module.exp_block_sums(logits, t, work, block)
