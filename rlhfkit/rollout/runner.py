"""The model side of the engine: a preallocated KV cache and a decode loop over the live weights.

We do not call the Hugging Face ``forward`` during generation: its per-step cost (cache objects,
mask building, output dataclasses) dominates at small model sizes on a CPU. Instead we walk the
model's own modules — ``embed_tokens``, each layer's norms, ``q/k/v/o_proj`` and ``mlp``, the final
norm and ``lm_head`` — in the same order as the HF LLaMA forward, with attention (SDPA) over our
own preallocated cache. Nothing is copied or exported: every step reads the parameters the
optimizer is updating, so PPO can sample right after ``optimizer.step()``. Wrapped projections
(LoRA via PEFT) still work because we call the modules, not their ``.weight``.

Supported: decoder-only models laid out like ``LlamaForCausalLM`` (LLaMA, SmolLM/SmolLM2, Mistral
without sliding window, Qwen2) — see ``check_supported``.

Cache layout: one tensor per layer for keys and one for values, ``(S, Hkv, L, D)`` where S is the
number of slots (rows of the decode batch) and L the longest prompt + max_new_tokens of the call.
Slot ``s`` holds ``lens[s]`` valid positions ``0..lens[s]-1``; every sequence starts at position 0
of its slot, so RoPE positions are simply the slot offsets and prompts of different lengths need
no left padding. Attention masks keys at offsets ``>= lens[s]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.errors import UserError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def check_supported(model: torch.nn.Module) -> None:
    """Raise a clear error for models whose forward we do not reproduce exactly."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UserError(
            f"rollout engine: model_type={mtype!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", mtype == "mistral"):
        raise UserError(f"rollout engine: sliding-window attention ({mtype}, window {window}) is not supported")


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The inner ``LlamaModel`` (handles PEFT wrappers through ``get_decoder``)."""
    base = model
    if hasattr(base, "get_base_model"):  # peft.PeftModel
        base = base.get_base_model()
    dec = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return dec


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the RoPE convention of HF LLaMA)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x (B, H, T, D), cos/sin (B, 1, T, D) -> (B, H, T, D)."""
    return x * cos + rotate_half(x) * sin


def attention_chunks(lens: list[int], n: int = 4) -> list[tuple[int, int, int]]:
    """Split decode rows into up to n contiguous chunks, each attending over its own span.

    Attention reads every cached position up to the span, and one long prompt would make all rows
    read up to its length; rows are admitted sorted by prompt length, so per-chunk spans cut the
    reads (memory-bound on a CPU). Returns [(row_start, row_end, span)], span = max(lens) + 1 of
    the chunk; one chunk when splitting saves < 20%. Example: lens [3, 4, 20, 21], n=2 ->
    [(0, 2, 5), (2, 4, 22)].
    """
    B = len(lens)
    whole = [(0, B, max(lens) + 1)]
    if B < 2 * n:
        return whole
    size = -(-B // n)
    chunks = [(a, min(a + size, B), max(lens[a : a + size]) + 1) for a in range(0, B, size)]
    if sum((b - a) * s for a, b, s in chunks) > 0.8 * B * whole[0][2]:
        return whole
    return chunks


@dataclass
class KVCache:
    """Preallocated keys/values for S slots of L positions, plus the valid length of each slot."""

    k: list[torch.Tensor]  # n_layers × (S, Hkv, L, D)
    v: list[torch.Tensor]  # n_layers × (S, Hkv, L, D)
    lens: torch.Tensor  # (S,) long, valid positions per slot (on the model device)

    @property
    def slots(self) -> int:
        return self.lens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, span: int) -> None:
        """Copy slots ``src`` to slots ``dst`` (first ``span`` positions): compaction."""
        for t in (*self.k, *self.v):
            t[dst, :, :span] = t[src, :, :span]
        self.lens[dst] = self.lens[src]


class Runner:
    """Prefill and decode over a model's live modules with a preallocated KV cache.

    ``compute_dtype`` is the dtype activations and the cache use: bf16 when the model is bf16, or
    when the model is fp32 and bf16 was asked for (then ``autocast`` casts the weights on the fly;
    its weight-cast cache makes that once per ``generate`` call for trainable parameters).
    """

    def __init__(self, model: torch.nn.Module, precision: str = "fp32"):
        check_supported(model)
        self.model = model
        self.dec = _decoder(model)
        cfg = model.config
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.lm_head = model.get_output_embeddings()
        self.precision = precision

    # ------------------------------------------------------------------ precision, device

    @property
    def device(self) -> torch.device:
        return self.dec.embed_tokens.weight.device

    @property
    def param_dtype(self) -> torch.dtype:
        return self.dec.embed_tokens.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.precision == "bf16":
            return torch.bfloat16
        return self.param_dtype

    def autocast(self):
        """bf16 autocast when the weights are not bf16 already; a no-op context otherwise."""
        if self.precision == "bf16" and self.param_dtype != torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=True)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ cache

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        shape = (slots, self.n_kv, max_len, self.head_dim)
        kw = dict(dtype=self.compute_dtype, device=self.device)
        k = [torch.zeros(shape, **kw) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, **kw) for _ in range(self.n_layers)]
        return KVCache(k, v, torch.zeros(slots, dtype=torch.long, device=self.device))

    def rope_tables(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..max_len-1 from the model's own rotary module: (L, D) each."""
        pos = torch.arange(max_len, device=self.device)[None]  # (1, L)
        dummy = torch.empty(0, dtype=self.compute_dtype, device=self.device)
        cos, sin = self.dec.rotary_emb(dummy, pos)
        return cos[0].to(self.compute_dtype), sin[0].to(self.compute_dtype)

    # ------------------------------------------------------------------ forward

    def _layers(self, h, cos, sin, attend):
        """Run all decoder layers. h (B, T, d); cos/sin (B, 1, T, D); attend(layer, q, k, v) -> (B, H, T, D)."""
        B, T, _ = h.shape
        for i, layer in enumerate(self.dec.layers[: self.n_layers]):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = attn.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            v = attn.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            q = apply_rope(q, cos, sin).to(self.compute_dtype)
            k = apply_rope(k, cos, sin).to(self.compute_dtype)
            o = attend(i, q, k, v.to(self.compute_dtype))  # (B, H, T, D)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.dec.norm(h)

    @torch.no_grad()
    def prefill(
        self,
        cache: KVCache,
        ids: torch.Tensor,
        lens: torch.Tensor,
        slots: torch.Tensor,
        src: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Process P right-padded prompts once and copy their keys/values into their slots.

        ids (P, T) long, right-padded (pad values are never attended to); lens (P,) true lengths;
        slots (N,) destination slots, src (N,) which prompt each slot receives (K samples of one
        prompt = K slots with the same src: one prefill, K copies of its cache).
        Returns the fp32 next-token logits of each slot's prompt: (N, V).
        """
        P, T = ids.shape
        cos, sin = rope[0][:T][None, None], rope[1][:T][None, None]  # (1, 1, T, D)
        key_ok = torch.arange(T, device=ids.device)[None, :] < lens[:, None]  # (P, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # (T, T)
        keep = (causal[None] & key_ok[:, None, :])[:, None]  # (P, 1, T, T)
        mask = torch.zeros(keep.shape, dtype=self.compute_dtype, device=ids.device).masked_fill_(~keep, float("-inf"))

        def attend(i, q, k, v):
            cache.k[i][slots, :, :T] = k[src]
            cache.v[i][slots, :, :T] = v[src]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)

        h = self.dec.embed_tokens(ids)  # (P, T, d)
        h = self._layers(h, cos, sin, attend)
        last = h[torch.arange(P, device=ids.device), lens - 1]  # (P, d)
        logits = self.lm_head(last).float()  # (P, V)
        cache.lens[slots] = lens[src]
        return logits[src]  # (N, V)

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One step for slots 0..B-1: append ``tokens`` (B,) at offsets ``cache.lens[:B]``.

        Returns the fp32 next-token logits (B, V). Slots must be packed at the front (the engine
        compacts them); idle slots among them just compute a throwaway row.
        """
        B = tokens.shape[0]
        pos = cache.lens[:B]  # (B,)
        chunks = attention_chunks(pos.tolist())  # [(row0, row1, span)]
        span = max(c[2] for c in chunks)
        cos, sin = rope[0][pos][:, None, None], rope[1][pos][:, None, None]  # (B, 1, 1, D)
        # additive mask built once per step (a bool mask is converted inside every SDPA call)
        keep = torch.arange(span, device=tokens.device)[None, :] <= pos[:, None]  # (B, span)
        mask = torch.zeros(B, 1, 1, span, dtype=self.compute_dtype, device=tokens.device)
        mask.masked_fill_(~keep[:, None, None], float("-inf"))  # (B, 1, 1, span)
        G = self.n_heads // self.n_kv
        # where each row's new key goes in the flattened cache (S·Hkv·L, D): one index_copy_
        # per layer instead of an advanced-index write
        L = cache.max_len
        heads = torch.arange(self.n_kv, device=tokens.device)
        dest = ((torch.arange(B, device=tokens.device)[:, None] * self.n_kv + heads) * L + pos[:, None]).reshape(-1)

        def attend(i, q, k, v):
            kc, vc = cache.k[i], cache.v[i]
            kc.view(-1, self.head_dim).index_copy_(0, dest, k.reshape(B * self.n_kv, self.head_dim))
            vc.view(-1, self.head_dim).index_copy_(0, dest, v.reshape(B * self.n_kv, self.head_dim))
            # The G = H / Hkv query heads sharing a kv head become G query positions of that kv
            # head: (B, Hkv, G, D) against (B, Hkv, span, D), no repeat of K/V. Head h = kv * G + g,
            # as in HF's repeat_kv.
            qg = q.reshape(B, self.n_kv, G, self.head_dim)  # (B, Hkv, G, D)
            outs = [
                F.scaled_dot_product_attention(
                    qg[a:b], kc[a:b, :, :s], vc[a:b, :, :s], attn_mask=mask[a:b, ..., :s], scale=self.scaling
                )
                for a, b, s in chunks
            ]
            o = outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, Hkv, G, D)
            return o.view(B, self.n_heads, 1, self.head_dim)

        h = self.dec.embed_tokens(tokens[:, None])  # (B, 1, d)
        h = self._layers(h, cos, sin, attend)
        cache.lens[:B] += 1
        return self.lm_head(h[:, 0]).float()  # (B, V)
