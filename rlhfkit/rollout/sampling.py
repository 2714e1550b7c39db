"""Sampling settings and the pure math of picking the next token.

Which log-probs we return (what PPO needs): ``log_softmax(logits / T)`` of the token that was
sampled, over the FULL vocabulary — the temperature-scaled distribution *before* top-k / top-p
filtering. That is the policy π(a|s) that PPO's ratio and KL use when training at temperature T
(the trainer recomputes ``log_softmax(logits / T)`` of the same tokens). With top-k/top-p on,
the tokens are drawn from the filtered, renormalised distribution, so these log-probs are not
the sampling distribution's: that mismatch is the usual one of PPO implementations (TRL, OpenRLHF)
and is why RLHF runs sample with top_k=0, top_p=1. Greedy rows (T = 0) return ``log_softmax(logits)``.

Seeds are per sample: sample ``s`` of a request seeded ``seed`` with prompt ``ids`` draws its uniform
number for token ``t`` from its own counter-based stream, ``uniform(stream_key(seed, s, ids), t)``
(SplitMix64), so what a prompt samples does not depend on which other prompts share its batch,
their order, the batch size, or which process generates it (PPO on several processes samples what
one process samples). The prompt is part of the key so that one seed given to many prompts
(``SamplingParams`` shared by a call) still gives each prompt its own streams; the same prompt with
the same seed samples the same. Each token is still one inverse-CDF draw from softmax(logits / T)
(after top-k/top-p): exact sampling, one random number per row and step, as before.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhfkit.errors import UserError
from rlhfkit.rollout import attention_cpu

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range (signed or unsigned 64-bit)


@dataclass
class SamplingParams:
    """How to sample one request (one prompt, possibly ``n`` samples of it)."""

    max_new_tokens: int = 256
    """Largest number of new tokens per sample; finish_reason='length' when reached."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends at the token that completes one; the text excludes it."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a sample (kept in token_ids); None = the tokenizer's EOS."""
    ignore_eos: bool = False
    """Never stop at stop_token_ids (benchmarks: always produce max_new_tokens)."""
    seed: int | None = None
    """Seed of this request: its sample ``s`` draws from its own stream ``stream_key(seed, s, prompt)``,
    so the samples do not depend on the rest of the batch; None = a random stream (torch's global RNG).
    SEED_MIN <= seed <= SEED_MAX (what ``torch.Generator.manual_seed`` takes)."""
    logprobs: int = 0
    """Also return the ``logprobs`` most likely tokens at each step with their log-probs
    (``Completion.top_logprobs``, the OpenAI API's ``top_logprobs``); 0 = off."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature}: expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p}: expected 0 < top_p <= 1")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
        if any(not s for s in self.stop):
            raise UserError("stop strings must be non-empty")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise UserError(f"seed={self.seed}: expected {SEED_MIN} <= seed <= {SEED_MAX}")
        if self.logprobs < 0:
            raise UserError(f"logprobs={self.logprobs}: expected >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits (B, V) / T (B,), with T = 0 (greedy) treated as 1. Returns (B, V) fp32."""
    if bool(((temperature == 1) | (temperature == 0)).all()):
        return logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits.float() / t[:, None]


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf. logits (B, V), k (B,) long, 0 = off.

    Ties at the k-th value are all kept (like HF's TopKLogitsWarper).
    Example: [1, 3, 2, 0] with k=2 -> [-inf, 3, 2, -inf].
    """
    V = logits.shape[-1]
    k = torch.where(k > 0, k.clamp(max=V), torch.full_like(k, V))  # (B,)
    kmax = int(k.max())
    top = torch.topk(logits, kmax, dim=-1).values  # (B, kmax) sorted descending
    kth = top.gather(-1, (k - 1)[:, None])  # (B, 1) the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest top set whose softmax mass reaches p. logits (B, V), p (B,).

    A token is kept if the mass of the tokens strictly more likely than it is < p, so the most
    likely token is always kept. Example: probs [0.5, 0.3, 0.15, 0.05], p=0.8 -> keeps the first
    two (0.5 < 0.8, 0.8 is not < 0.8); p=0.81 -> keeps three.
    """
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) exclusive cumulative mass
    drop_sorted = mass_before >= p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2**64 / golden ratio, odd


def _mix64(z: int) -> int:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014; the output function of Java's SplittableRandom):
    a bijection on 64-bit ints whose outputs over consecutive counters pass BigCrush."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, sample: int, prompt: Sequence[int] = ()) -> int:
    """The 64-bit key of the random stream of sample ``sample`` of a request seeded ``seed`` whose
    prompt is the token ids ``prompt``.

    Every input goes through the mixer, so nearby seeds and sample indices give unrelated keys (seed
    s, sample 1 is not seed s + 1, sample 0), and two prompts under one seed get unrelated streams
    (a BLAKE2b digest of the ids: no Python hash, the same in every process and version). Every
    backend derives its per-sample streams here.
    """
    ids = array("q", prompt).tobytes()
    digest = int.from_bytes(hashlib.blake2b(ids, digest_size=8).digest(), "little") if ids else 0
    return _mix64((_mix64(_mix64(seed & _MASK64) ^ digest) + _GOLDEN * (sample + 1)) & _MASK64)


def uniform(key: int, step: int) -> float:
    """The uniform number in [0, 1) that a stream ``key`` gives for token ``step`` (0 = the first
    new token): SplitMix64 of seed ``key`` at index ``step``, its top 24 bits (an fp32 value exactly,
    as ``torch.rand`` makes them). Counter-based: no state to carry between steps or calls."""
    return (_mix64((key + _GOLDEN * (step + 1)) & _MASK64) >> 40) * 2.0**-24


def random_key() -> int:
    """A stream key for an unseeded request, from torch's global RNG (so ``torch.manual_seed``
    still makes unseeded calls repeatable)."""
    hi, lo = torch.randint(0, 2**32, (2,)).tolist()
    return hi << 32 | lo


def row_uniforms(keys: list[int], steps: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``uniform(key, step)`` of each row -> (B,) fp32 on ``device`` (one small host-to-device copy)."""
    return torch.tensor([uniform(k, t) for k, t in zip(keys, steps)], dtype=torch.float32, device=device)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF (see _inverse_cdf)


def _fused_exp(logits: torch.Tensor, padded: torch.Tensor) -> bool:
    """Whether the C++ pass of ``attention_cpu.exp_block_sums`` can make the probabilities."""
    return (
        logits.dtype == torch.bfloat16
        and logits.device.type == "cpu"
        and logits.is_contiguous()
        and padded.is_contiguous()
        and padded.shape[1] % CDF_BLOCK == 0
        and CDF_BLOCK % 16 == 0
        and attention_cpu.available()
    )


def sampling_workspace(rows: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reusable fp32 buffer for ``sample_next``: (rows, vocab rounded up to CDF_BLOCK), tail zero.

    Sampling writes (B, V) fp32 probabilities every step; a fresh 25 MB tensor per step
    (128 × 49,152) costs more than the arithmetic on a CPU (page faults of new pages: 43 ms vs
    8 ms per step measured), so the engine keeps one for the whole call.
    """
    return torch.zeros(rows, -(-vocab // CDF_BLOCK) * CDF_BLOCK, device=device)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
    filtering: bool = True,
    workspace: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens (B,) long, logprobs (B,) fp32).

    logits (B, V) raw, fp32 or bf16 (upcast inside); temperature (B,) (0 = greedy); top_k (B,)
    long (0 = off); top_p (B,). logprobs = log_softmax(logits / T)[token] before filtering (see
    the module docstring). ``filtering=False`` skips top-k/top-p entirely (a fast path when no
    row uses them). ``workspace``: a ``sampling_workspace`` of at least B rows, reused (optional).
    ``uniforms`` (B,) in [0, 1): each row's random number (``row_uniforms``, per-sample streams);
    None: drawn from ``generator`` (or torch's global RNG).
    Sampling is inverse-CDF: one uniform number per row against the cumulative sum of the
    probabilities (what ``torch.multinomial`` does, without its per-call overhead; the
    exponential-race/Gumbel forms need V random numbers per row, ~6× slower on a CPU).
    """
    greedy = temperature == 0
    if bool(greedy.all()):
        tokens = logits.argmax(dim=-1)
        scaled = logits.float()
        return tokens, scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
    if filtering and (bool((top_k > 0).any()) or bool((top_p < 1).any())):
        scaled = scale_logits(logits, temperature)  # (B, V)
        filt = top_k_filter(scaled, top_k) if bool((top_k > 0).any()) else scaled
        filt = top_p_filter(filt, top_p) if bool((top_p < 1).any()) else filt
        tokens = sample_from_probs(torch.softmax(filt, dim=-1), generator, uniforms)
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
        logp = scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
        return tokens, logp
    # The RLHF case: sample from softmax(logits / T) over the whole vocabulary. The unnormalised
    # probabilities exp((x - max) / T) are made in place in the workspace (upcast, max, subtract,
    # exp), and their sum, which the inverse CDF computes anyway, is the normaliser: no separate
    # log_softmax pass over the vocabulary. Greedy rows use T = 1 here, then argmax.
    B, V = logits.shape
    if workspace is None:
        workspace = sampling_workspace(B, V, logits.device)
    padded = workspace[:B]  # (B, Vpad), columns V.. stay 0 (zero probability)
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]  # (B, 1)
    if _fused_exp(logits, padded):
        # bf16 on a CPU: upcast, max, subtract, divide, exp and the block sums in one C++ pass
        m, block_sums = attention_cpu.exp_block_sums(logits, t[:, 0].contiguous(), padded, CDF_BLOCK)
        tokens, total = _inverse_cdf(padded, generator, block_sums=block_sums, uniforms=uniforms)
    else:
        e = padded[:, :V].copy_(logits)  # (B, V) fp32 view
        m = e.amax(dim=-1, keepdim=True)  # (B, 1)
        e.sub_(m)
        if bool((t != 1).any()):
            e.div_(t)
        e.exp_()
        tokens, total = _inverse_cdf(padded, generator, uniforms=uniforms)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    # log p = (x - max) / T - log Σ exp((x - max) / T), from the exact logit of the token
    picked = logits.gather(-1, tokens[:, None]).float()  # (B, 1)
    return tokens, ((picked - m) / t - total.log())[:, 0]


def top_logprobs(logits: torch.Tensor, temperature: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row and their log-probs: (B, k) long, (B, k) fp32.

    The same distribution as ``sample_next``'s log-probs, log_softmax(logits / T) over the full
    vocabulary before top-k/top-p (T = 0 counts as 1), so the sampled token's log-prob equals its
    entry here whenever it is among the k. Example: logits [[2, 0, 1]], T = 1, k = 2 ->
    tokens [[0, 2]], log-probs [[-0.408, -1.408]].
    """
    logp = torch.log_softmax(scale_logits(logits, temperature), dim=-1)  # (B, V)
    values, tokens = torch.topk(logp, k, dim=-1)  # sorted, most likely first
    return tokens, values


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from unnormalised probabilities (B, V) by inverse CDF -> (B,) long.

    Token i is chosen when cdf[i-1] <= u < cdf[i], u ~ U[0, total): zero-probability tokens
    (filtered out) are never chosen. Example: probs [[0.2, 0, 0.8]], u = 0.5 -> cdf [0.2, 0.2, 1.0]
    -> token 2. ``uniforms`` (B,): the rows' random numbers in [0, 1) (None: drawn from ``generator``).
    """
    return _inverse_cdf(probs, generator, CDF_BLOCK, uniforms=uniforms)[0]


def _inverse_cdf(
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
    block: int = CDF_BLOCK,
    block_sums: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_from_probs`` that also returns each row's total probability mass: (B,), (B, 1).

    Two levels, because a cumulative sum over V is the slowest pass on a CPU: pick a block of
    ``block`` tokens from the cumulative block sums, then the token inside that block.
    ``block_sums`` (B, nb): the blocks' sums when already computed. ``uniforms`` (B,) in [0, 1):
    the rows' random numbers (None: ``torch.rand`` on ``generator``).
    """
    B, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = torch.nn.functional.pad(probs, (0, nb * block - V))
    blocks = probs.view(B, nb, block)  # (B, nb, block)
    bcdf = (blocks.sum(-1) if block_sums is None else block_sums).cumsum(-1)  # (B, nb)
    total = bcdf[:, -1:]  # (B, 1)
    if uniforms is None:
        uniforms = torch.rand(B, generator=generator, device=probs.device, dtype=bcdf.dtype)
    u = uniforms.to(device=probs.device, dtype=bcdf.dtype)[:, None] * total  # (B, 1)
    u = torch.minimum(u, total * (1 - 2**-20))  # rand * total may round up to total
    blk = torch.searchsorted(bcdf, u, right=True).clamp_(max=nb - 1)  # (B, 1)
    before = torch.where(blk > 0, bcdf.gather(-1, (blk - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks.gather(1, blk[:, :, None].expand(B, 1, block))[:, 0].cumsum(-1)  # (B, block)
    r = torch.minimum(u - before, inner[:, -1:] * (1 - 2**-20))  # stay inside the block's mass
    j = torch.searchsorted(inner, r, right=True).clamp_(max=block - 1)  # (B, 1)
    return (blk * block + j)[:, 0], total
