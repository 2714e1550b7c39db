"""The model side of the engine: a preallocated KV cache and a decode loop over the live weights.

Generation walks the model's own modules (embeddings, each layer's norms, projections and MLP, the
final norm, ``lm_head``) in the order of HF's forward, with attention over our own cache, instead
of calling HF ``forward``, whose per-step overhead dominates small models on a CPU. Every step
reads the parameters the optimizer updates, so PPO samples right after ``optimizer.step()``;
LoRA-wrapped projections work because the modules are called. Families (``engine_support``):
LLaMA 1-3 (RoPE scaling comes with the model's rotary module), Mistral and Qwen2 (sliding windows
masked over the full cache, q/k/v biases), Qwen3 (per-head q/k norms), Gemma 1-3 (their own
(1 + weight) norms, scaled embeddings and GELU MLP as modules; pre/post feedforward norms,
attention and final logit soft-capping, ``query_pre_attn_scalar``, local/global layers with their
own RoPE bases). Anything else gets a reason and ``make_generator(backend="auto")`` uses HF.

Cache: per layer one key and one value tensor ``(S, Hkv, L, D)``; slot ``s`` holds positions
``0..lens[s]-1`` of its own sequence (a full copy of its prompt), so RoPE positions are slot offsets
and prompts need no left padding. Two paths through a layer, the same math: the module path (fp32,
HF's exact numerics; every family) and the bf16 fast path for LLaMA-shaped layers (q/k/v and
gate/up fused, weights prepacked for oneDNN at every call so they are never stale, and the fused
decode step of ``attention_cpu``, which reads shared prompt prefixes once; Qwen3's q/k norms and
sliding windows shorter than the cache take the plain decode attention instead of the fused step
or the C++ kernel). Gemma runs the module path under bf16 autocast. Switches for comparisons:
``share_prefix``, ``fuse_autocast``, ``decode_kernel``. Why and how much faster: see
docs/performance.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.errors import UserError
from rlhfkit.models.lora import unwrap
from rlhfkit.rollout import attention_cpu

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
LAYER_TYPES = ("full_attention", "sliding_attention")
SEQ_LEN_ROPE = ("dynamic", "longrope")  # frequencies that depend on the length of each forward call


def engine_support(config) -> str | None:
    """None when the engine reproduces this model config's forward exactly, else a short reason why not.

    ``make_generator(backend="auto")`` falls back to transformers' own ``generate`` on a reason; the
    ``Runner`` constructor raises it as a ``UserError``. Sliding windows are supported (masked over
    the full cache); what is not: other architectures, bidirectional attention, RoPE whose
    frequencies change with the sequence length, layer types other than full and sliding. The
    multimodal Gemma 3 (what ``AutoModelForCausalLM`` loads for Gemma 3 4B and up) runs its text
    model on text prompts.
    """
    mtype = getattr(config, "model_type", None)
    if mtype == "gemma3":
        config = config.get_text_config()
        if config.final_logit_softcapping is not None:  # applied by Gemma3ForCausalLM only
            return "final logit soft-capping in the multimodal Gemma 3"
        mtype = config.model_type
    if mtype not in SUPPORTED_TYPES:
        return f"model_type {mtype} has no engine path (engine families: {', '.join(SUPPORTED_TYPES)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if other:
        return f"layer types {', '.join(other)}"
    rope = [r for r in _rope_types(config) if r in SEQ_LEN_ROPE]
    if rope:
        return f"rope type {rope[0]} (its frequencies depend on the sequence length)"
    return None


def _rope_types(config) -> list[str]:
    """The RoPE types a config names: ``rope_parameters`` (one dict, or one per layer type) or the
    older ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    dicts = [v for v in params.values() if isinstance(v, dict)] or [params]
    return [d.get("rope_type") or d.get("type") or "default" for d in dicts]


def layer_windows(config) -> list[int | None]:
    """Per decoder layer, its sliding attention window (a query at position p sees keys j with
    p - window < j <= p), or None for full attention: from ``layer_types`` where the config has
    them (Qwen2/3, Gemma 2/3), every layer for Mistral and Phi-3."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * n
    if types:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    return [window] * n if config.model_type in ("mistral", "phi3") else [None] * n


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The inner ``LlamaModel`` (handles PEFT wrappers through ``get_decoder``)."""
    base = unwrap(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the RoPE convention of HF LLaMA)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x (B, H, T, D), cos/sin (B, 1, T, R) -> (B, H, T, D). R < D (partial
    rotary, Phi-3's ``partial_rotary_factor``): the first R dims rotate, the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    return x * cos + rotate_half(x) * sin


def apply_rope_fused(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in 3 ops instead of 6: rotate_half(x)·sin = roll(x, D/2)·[-sin1, sin2].

    x (..., D); cos/sin_signed broadcastable to x. Same values as apply_rope up to the rounding
    of one fused multiply-add.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


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


class FusedLinear:
    """x @ W.T + b for one or several ``nn.Linear`` fused along the output dim, weights read now.

    ``pack``: reorder W once into oneDNN's blocked bf16 layout (CPU); otherwise ``F.linear`` on
    the concatenated weight (for a single bf16 weight that is the live parameter itself).
    """

    def __init__(self, mods: list[torch.nn.Linear], dtype: torch.dtype, pack: bool, rows_hint: int):
        w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight  # (out, in)
        w = w.detach().to(dtype)
        self.bias = None
        if any(m.bias is not None for m in mods):
            self.bias = torch.cat([m.bias if m.bias is not None else w.new_zeros(m.out_features) for m in mods])
            self.bias = self.bias.detach().to(dtype)
        self.pack = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint) if pack else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pack:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _qkv_mods(attn: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention's q, k, v projections, or its one fused ``qkv_proj`` (Phi-3: q, k, v heads in
    that order along the output dim)."""
    return [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]


def _is_plain_linear(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear  # a PEFT LoRA layer is a subclass of nn.Module, not Linear


def _cat_outputs(fns: list[Callable]) -> Callable:
    """One callable for projections that could not be fused: outputs concatenated on the last dim."""
    return lambda x: torch.cat([f(x) for f in fns], dim=-1)


@dataclass
class FastLayer:
    """One decoder layer prepared for the fast path (see the module docstring)."""

    in_norm: Callable  # (…, d) -> (…, d)
    qkv: Callable  # (…, d) -> (…, (H + 2·Hkv)·D): q heads, then k heads, then v heads
    o: Callable  # (…, H·D) -> (…, d)
    post_norm: Callable
    mlp: Callable  # (…, d) -> (…, d)
    # for the fused C++ decode step (attention_cpu): RMSNorm (weight, eps) of in/post norm, and
    # the SwiGLU MLP's (gate_up, down) matmuls; None where the layer is not laid out that way
    norms: tuple | None = None
    swiglu: tuple | None = None
    qk_norm: tuple | None = None  # Qwen3's per-head (q_norm, k_norm) modules, before RoPE


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
        reason = engine_support(getattr(model, "config", None))
        if reason is not None:
            raise UserError(f"rollout engine: {reason}")
        self.model = model
        self.dec = _decoder(model)
        cfg = model.config.get_text_config()  # the config itself, or a multimodal Gemma 3's text part
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = self.dec.layers[: self.n_layers]
        # per layer: the attention's own scale (Gemma: query_pre_attn_scalar**-0.5), sliding window,
        # and which RoPE table it uses (Gemma 3: one per layer type, with different bases)
        self.scalings = [float(getattr(layer.self_attn, "scaling", self.head_dim**-0.5)) for layer in layers]
        self.windows = layer_windows(cfg)
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)  # Gemma 2: tanh-capped attention logits
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.rope_kinds = getattr(self.dec.rotary_emb, "layer_types", None)  # None: one table for all layers
        types = getattr(cfg, "layer_types", None)
        self.rope_index = [self.rope_kinds.index(types[i]) if self.rope_kinds else 0 for i in range(self.n_layers)]
        dummy = torch.empty(0, device=self.device)
        pos0 = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        kind = [self.rope_kinds[0]] if self.rope_kinds else []
        self.rotary_dim = self.dec.rotary_emb(dummy, pos0, *kind)[0].shape[-1]  # < head_dim: partial rotary
        # Gemma 2/3 layers norm the attention and MLP outputs too (pre/post feedforward norms)
        self.sandwich = hasattr(layers[0], "pre_feedforward_layernorm")
        self.lm_head = model.get_output_embeddings()
        self.precision = precision
        self.fast = True  # use the fast path in bf16 (tests turn it off to compare with modules)
        self.decode_kernel = True  # the fast path's decode attention in C++ where it builds (attention_cpu)
        self.last_decode_kernel = False  # whether the last decode step used it
        self.last_decode_fused = False  # ... and the fused C++ decode step
        self.fuse_autocast = True  # fp32 model under bf16 autocast: fused step, bf16 residual stream
        self.share_prefix = True  # the kernel reads a prompt's keys/values once per group of its samples
        self.last_decode_shared = 0  # rows of the last decode step whose prompt was read through another row
        self._bound: tuple[list[FastLayer], Callable] | None = None
        self._final_norm: tuple[torch.Tensor, float] | None = None  # the final RMSNorm's bf16 (weight, eps)

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

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def uses_fast_path(self) -> bool:
        """bf16 LLaMA-shaped layers: Gemma's extra norms and soft-capping, and partial rotary, take the module path
        (under bf16 autocast), which runs every family."""
        llama_shaped = not self.sandwich and self.softcap is None and self.rotary_dim == self.head_dim
        return self.fast and llama_shaped and self.compute_dtype == torch.bfloat16

    # ------------------------------------------------------------------ fast path weights

    def _can_pack(self) -> bool:
        if self.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.mkldnn
        return hasattr(ops, "_reorder_linear_weight") and bool(ops._is_mkldnn_bf16_supported())

    def _norm(self, mod: torch.nn.Module) -> Callable:
        """A LLaMA-style RMSNorm as one fused ``F.rms_norm``; other norms are called as modules."""
        eps = getattr(mod, "variance_epsilon", None)
        w = getattr(mod, "weight", None)
        if eps is None or not isinstance(w, torch.Tensor) or type(mod).__name__ not in _RMS_NORMS:
            return mod
        return lambda h: F.rms_norm(h, (h.shape[-1],), w, eps)

    @torch.no_grad()
    def bind(self, rows_hint: int = 128) -> None:
        """Take the fast path's weights from the live modules (start of every generate call)."""
        self._bound = None
        if not self.uses_fast_path:
            return
        dt = self.compute_dtype
        pack = self._can_pack()
        act_silu = getattr(self.cfg, "hidden_act", None) == "silu"

        def linear(mods):
            if all(_is_plain_linear(m) for m in mods):
                return FusedLinear(mods, dt, pack, rows_hint)
            if len(mods) == 1:
                return mods[0]
            return _cat_outputs([linear([m]) for m in mods])

        layers = []
        for layer in self.dec.layers[: self.n_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
            gate_up = [gate, up] if gate is not None and up is not None else [getattr(mlp, "gate_up_proj", None)]
            swiglu = None
            if act_silu and None not in gate_up and down is not None:  # Phi-3: gate and up already fused
                swiglu = (linear(gate_up), linear([down]))
                mlp = _swiglu(*swiglu, sum(m.out_features for m in gate_up) // 2)
            norms = (_rms_params(layer.input_layernorm), _rms_params(layer.post_attention_layernorm))
            layers.append(
                FastLayer(
                    in_norm=self._norm(layer.input_layernorm),
                    qkv=linear(_qkv_mods(attn)),
                    o=linear([attn.o_proj]),
                    post_norm=self._norm(layer.post_attention_layernorm),
                    mlp=mlp,
                    norms=norms if None not in norms else None,
                    swiglu=swiglu,
                    qk_norm=(attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None,
                )
            )
        self._bound = (layers, linear([self.lm_head]))
        self._final_norm = _rms_params(self.dec.norm)

    def unbind(self) -> None:
        """Drop the fast path's weights (end of a generate call: they must not go stale)."""
        self._bound = None
        self._final_norm = None

    # ------------------------------------------------------------------ cache

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        shape = (slots, self.n_kv, max_len, self.head_dim)
        kw = dict(dtype=self.compute_dtype, device=self.device)
        k = [torch.zeros(shape, **kw) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, **kw) for _ in range(self.n_layers)]
        return KVCache(k, v, torch.zeros(slots, dtype=torch.long, device=self.device))

    def rope_tables(self, max_len: int) -> tuple[torch.Tensor, ...]:
        """cos, sin, sin_signed for positions 0..max_len-1 from the model's rotary module: (L, D) each.

        sin_signed = [-sin[:D/2], sin[D/2:]] (see apply_rope_fused). A rotary module with one table
        per layer type (Gemma 3) gives these three for each type in turn (``rope_index``); the
        engine passes the tuple through as it is.
        """
        pos = torch.arange(max_len, device=self.device)[None]  # (1, L)
        dummy = torch.empty(0, dtype=self.compute_dtype, device=self.device)
        out = []
        for kind in self.rope_kinds or [None]:
            cos, sin = self.dec.rotary_emb(dummy, pos) if kind is None else self.dec.rotary_emb(dummy, pos, kind)
            cos, sin = cos[0].to(self.compute_dtype), sin[0].to(self.compute_dtype)
            half = cos.shape[-1] // 2
            out += [cos, sin, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)]
        return tuple(out)

    def _rope(self, rope: tuple, i: int) -> tuple:
        """Layer i's (cos, sin, sin_signed) out of ``rope_tables``' tuple (or slices of it)."""
        r = self.rope_index[i]
        return rope[3 * r : 3 * r + 3]

    def _mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Boolean keep mask -> additive mask (0 / -inf) in the compute dtype (one conversion, not
        one per attention call)."""
        return torch.zeros(keep.shape, dtype=self.compute_dtype, device=keep.device).masked_fill_(~keep, float("-inf"))

    def _attention(self, i: int, q, k, v, mask) -> torch.Tensor:
        """Layer i's attention: q (B, H, T, D), k/v (B, Hkv, S, D), additive mask broadcastable to
        (B, H, T, S) -> (B, H, T, D). SDPA; with logit soft-capping (Gemma 2) the eager math of HF's
        ``eager_attention_forward``: scores·scale, tanh cap, mask, softmax in fp32."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scalings[i], enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scalings[i]
        w = torch.tanh(w / self.softcap) * self.softcap + mask
        return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    # ------------------------------------------------------------------ forward

    def _layers(self, h, rope, attend):
        """Run all decoder layers and the final norm. h (B, T, d); rope = ``rope_tables``' tensors,
        each (B or 1, T, D) for the positions of h; attend(layer, q, k, v) -> (B, H, T, D) with
        q (B, H, T, D), k/v (B, Hkv, T, D).

        The module path, in the order of HF's forward of each family: per-head q/k RMSNorms before
        RoPE (Qwen3, Gemma 3), and Gemma 2/3's norms on the attention and MLP outputs; norms,
        MLPs and embeddings are the model's own modules (Gemma's (1 + weight) norms, its GELU)."""
        if self._bound is not None:
            return self._layers_fast(h, rope, attend)
        B, T, _ = h.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.dec.layers[: self.n_layers]):
            cos, sin, _ = self._rope(rope, i)
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qkv = [m(x) for m in _qkv_mods(attn)]
            q, k, v = qkv if len(qkv) == 3 else qkv[0].split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.view(B, T, H, D)
            k = k.view(B, T, Hkv, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin).to(self.compute_dtype)  # (B, H, T, D)
            k = apply_rope(k.transpose(1, 2), cos, sin).to(self.compute_dtype)  # (B, Hkv, T, D)
            o = attend(i, q, k, v.to(self.compute_dtype))  # (B, H, T, D)
            a = attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
            if self.sandwich:
                h = h + layer.post_attention_layernorm(a)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + a
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.dec.norm(h)

    def _layers_fast(self, h, rope, attend):
        """``_layers`` on the bound weights (see the module docstring). The residual stream h keeps
        its dtype (bf16 for a bf16 model, fp32 under autocast, as in HF); matmul inputs are bf16.
        LLaMA-shaped layers only (``bind``), with Qwen3's q/k norms as modules."""
        B, T, _ = h.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        dt = self.compute_dtype
        layers, _ = self._bound
        for i, layer in enumerate(layers):
            cos, _, sin_signed = self._rope(rope, i)
            cos, sin_signed = cos[:, :, None], sin_signed[:, :, None]  # (B, T, 1, D)
            x = layer.in_norm(h).to(dt)
            qkv = layer.qkv(x).view(B, T, H + 2 * Hkv, D)
            qk = qkv[:, :, : H + Hkv]
            if layer.qk_norm is not None:
                qk = torch.cat([layer.qk_norm[0](qk[:, :, :H]), layer.qk_norm[1](qk[:, :, H:])], dim=2)
            # q and k heads rotated together in one pass: (B, T, H + Hkv, D)
            qk = apply_rope_fused(qk, cos, sin_signed).to(dt)
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
            k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, D)
            v = qkv[:, :, H + Hkv :].transpose(1, 2).to(dt)  # (B, Hkv, T, D)
            o = attend(i, q, k, v)  # (B, H, T, D)
            h = h + layer.o(o.transpose(1, 2).reshape(B, T, H * D))
            h = h + layer.mlp(layer.post_norm(h).to(dt))
        return self._norm(self.dec.norm)(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head on final hidden states (…, d) -> (…, V) in the compute dtype (fp32 on the module path)."""
        logits = self._head(h)
        if self.final_softcap is not None:  # Gemma 2/3
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self._bound is not None:
            return self._bound[1](h.to(self.compute_dtype))
        w = self.lm_head.weight
        if (
            _is_plain_linear(self.lm_head)
            and w.device.type == "cpu"
            and w.dtype == torch.float32
            and h.dim() == 2
            and h.shape[0] <= HEAD_CHUNK_MAX_ROWS
            and h.dtype == w.dtype
        ):
            return head_in_chunks(h, w, self.lm_head.bias)
        return self.lm_head(h).float()

    @torch.no_grad()
    def prefill(
        self,
        cache: KVCache,
        ids: torch.Tensor,
        lens: torch.Tensor,
        slots: torch.Tensor,
        src: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """Process P right-padded prompts once and copy their keys/values into their slots.

        ids (P, T) long, right-padded (pad values are never attended to); lens (P,) true lengths;
        slots (N,) destination slots, src (N,) which prompt each slot receives (K samples of one
        prompt = K slots with the same src: one prefill, K copies of its cache).
        Returns the next-token logits of each slot's prompt: (N, V) (see ``_logits``).
        """
        P, T = ids.shape
        idx = torch.arange(T, device=ids.device)
        key_ok = idx[None, :] < lens[:, None]  # (P, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # (T, T)
        keep = (causal[None] & key_ok[:, None, :])[:, None]  # (P, 1, T, T)
        masks = {None: self._mask(keep)}
        for w in set(self.windows) - {None}:
            # sliding layers: keys within the window of each real query; padded queries keep
            # the causal mask, so no row is fully masked (that would give NaN keys downstream)
            near = (idx[:, None] - idx[None, :] < w)[None] | ~key_ok[:, :, None]  # (P, T, T)
            masks[w] = self._mask(keep & near[:, None])

        def attend(i, q, k, v):
            cache.k[i][slots, :, :T] = k[src]
            cache.v[i][slots, :, :T] = v[src]
            return self._attention(i, q, k, v, masks[self.windows[i]])

        h = self.dec.embed_tokens(ids)  # (P, T, d)
        h = self._layers(h, tuple(t[:T][None] for t in rope), attend)  # rope (1, T, D)
        last = h[torch.arange(P, device=ids.device), lens - 1]  # (P, d)
        logits = self._logits(last)  # (P, V)
        cache.lens[slots] = lens[src]
        return logits[src]  # (N, V)

    @torch.no_grad()
    def decode(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        groups: attention_cpu.PrefixGroups | None = None,
    ) -> torch.Tensor:
        """One step for slots 0..B-1: append ``tokens`` (B,) at offsets ``cache.lens[:B]``.

        Returns the next-token logits (B, V) (see ``_logits``). Slots must be packed at the front
        (the engine compacts them); idle slots among them just compute a throwaway row.
        ``groups``: rows whose slots hold the same first positions (the samples of one prompt, from
        one prefill); the C++ kernel then reads those positions once per group (same outputs, fewer
        reads; ignored by SDPA and when ``share_prefix`` is off). None: nothing shared.
        """
        B = tokens.shape[0]
        pos = cache.lens[:B]  # (B,)
        # bf16 fast path on a CPU: the C++ decode-attention kernel (attention_cpu.py) reads each
        # row's pos + 1 valid positions, no mask; SDPA over row chunks otherwise (and as fallback)
        n_valid = pos + 1  # (B,) keys per row once this step's key is written
        # a sliding window at least as long as the cache never hides a key; a shorter one needs
        # masks (SDPA), the kernel reads from position 0
        windows = [w if w is not None and w < cache.max_len else None for w in self.windows]
        kernel = (
            self.decode_kernel
            and self._bound is not None
            and all(w is None for w in windows)
            and attention_cpu.ready(cache.k[0], self.n_heads)
        )
        self.last_decode_kernel = kernel
        groups = groups if kernel and self.share_prefix else None
        self.last_decode_shared = 0 if groups is None else B - len(groups.plen)
        if not kernel:
            chunks = attention_chunks(pos.tolist())  # [(row0, row1, span)]
            span = max(c[2] for c in chunks)
            # additive mask built once per step (a bool mask is converted inside every SDPA call)
            keys = torch.arange(span, device=tokens.device)[None, :]  # (1, span)
            keep = keys <= pos[:, None]  # (B, span)
            masks = {None: self._mask(keep[:, None, None])}  # (B, 1, 1, span)
            for w in set(windows) - {None}:
                masks[w] = self._mask((keep & (keys > pos[:, None] - w))[:, None, None])
        # where each row's new key goes in the flattened cache (S·Hkv·L, D): one index_copy_
        # per layer instead of an advanced-index write
        L = cache.max_len
        heads = torch.arange(self.n_kv, device=tokens.device)
        dest = ((torch.arange(B, device=tokens.device)[:, None] * self.n_kv + heads) * L + pos[:, None]).reshape(-1)

        def attend(i, q, k, v):
            kc, vc = cache.k[i], cache.v[i]
            kc.view(-1, self.head_dim).index_copy_(0, dest, k.reshape(B * self.n_kv, self.head_dim))
            vc.view(-1, self.head_dim).index_copy_(0, dest, v.reshape(B * self.n_kv, self.head_dim))
            if kernel:
                return attention_cpu.decode_attention(q, kc, vc, n_valid, self.scalings[i], groups)  # (B, H, 1, D)
            # one query position per head against the kv head it shares (enable_gqa: no repeat
            # of K/V; head h uses kv head h // (H / Hkv), as in HF's repeat_kv)
            mask = masks[windows[i]]
            outs = [
                self._attention(i, q[a:b], kc[a:b, :, :s], vc[a:b, :, :s], mask[a:b, ..., :s]) for a, b, s in chunks
            ]
            return outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, H, 1, D)

        self.last_decode_fused = kernel and self._fusable()
        if self.last_decode_fused:
            h = self.dec.embed_tokens(tokens).to(torch.bfloat16)  # (B, d)
            h = self._decode_fused(h, pos, cache, rope, groups)
            cache.lens[:B] += 1
            return self._logits(h)
        h = self.dec.embed_tokens(tokens[:, None])  # (B, 1, d)
        h = self._layers(h, tuple(t[pos][:, None] for t in rope), attend)  # rope (B, 1, D) each
        cache.lens[:B] += 1
        return self._logits(h[:, 0])  # (B, V)

    def _fusable(self) -> bool:
        """Whether the whole decode step can take the fused C++ ops (residual stream in bf16): a bf16
        model, or an fp32 one under bf16 autocast unless ``fuse_autocast`` is off, whose layers are
        RMSNorm + SwiGLU without q/k norms and whose final norm is an RMSNorm (the caller checks that
        no sliding window applies)."""
        layers = self._bound[0]
        return (
            (self.param_dtype == torch.bfloat16 or (self.fuse_autocast and self.compute_dtype == torch.bfloat16))
            and all(layer.norms is not None and layer.swiglu is not None and layer.qk_norm is None for layer in layers)
            and self._final_norm is not None
            and not self.rope_kinds
        )

    def _decode_fused(self, h: torch.Tensor, pos: torch.Tensor, cache: KVCache, rope, groups=None) -> torch.Tensor:
        """The decode step's layers with the C++ ops of ``attention_cpu``: per layer, the qkv matmul,
        then RoPE + cache write + attention in one call, the o matmul, residual add + RMSNorm in one
        call, gate/up matmul, SiLU·up in one call, down matmul. Same math as ``_layers_fast`` with
        HF's bf16 roundings (the RoPE'd q/k round once instead of twice). h (B, d) bf16 embeddings
        -> (B, d) final hidden states."""
        layers, _ = self._bound
        cos, sin_signed = rope[0], rope[2]
        w, eps = layers[0].norms[0]
        x = F.rms_norm(h, (h.shape[-1],), w, eps).to(torch.bfloat16)  # fp32 out under autocast
        for i, layer in enumerate(layers):
            qkv = layer.qkv(x).contiguous()  # (B, (H + 2·Hkv)·D)
            o = attention_cpu.rope_cache_attention(
                qkv, cos, sin_signed, pos, cache.k[i], cache.v[i], self.n_heads, self.scalings[i], groups
            )
            x = attention_cpu.add_rms_norm(h, layer.o(o).contiguous(), *layer.norms[1])  # h += o(attn)
            gate_up, down = layer.swiglu
            m = down(attention_cpu.silu_mul(gate_up(x).contiguous())).contiguous()
            nxt = layers[i + 1].norms[0] if i + 1 < len(layers) else self._final_norm
            x = attention_cpu.add_rms_norm(h, m, *nxt)  # h += mlp(…), then the next norm
        return x


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")  # weight · x / rms(x)

HEAD_CHUNK = 1024  # vocabulary rows per matmul of ``head_in_chunks`` (2.4 MB of fp32 weights at d = 576)
HEAD_CHUNK_MAX_ROWS = 128  # above this many rows one matmul is as fast (measured, see head_in_chunks)


def head_in_chunks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, weight, bias)`` for the LM head of a decode step, over vocabulary chunks.

    h (B, d) with few rows, weight (V, d) -> (B, V). The same values: each output is the same dot
    product over d, only the vocabulary is split (bit for bit, except that for one row MKL may pick
    a GEMV whose sums differ in the last bit). Why: for few rows MKL's fp32 GEMM
    streams a large weight (SmolLM2: 49,152 x 576, 113 MB) far below memory bandwidth; in chunks
    that fit in L2 it runs ~1.7x faster at 16-64 rows (no gain from 256 rows on).
    """
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    for start in range(0, weight.shape[0], HEAD_CHUNK):
        stop = min(start + HEAD_CHUNK, weight.shape[0])
        out[:, start:stop] = F.linear(h, weight[start:stop], None if bias is None else bias[start:stop])
    return out


def _rms_params(mod: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a LLaMA-style RMSNorm, the weight in bf16 (a copy when it is fp32: read at
    ``bind``, like the packed matmul weights), None for any other norm."""
    w, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", None)
    if type(mod).__name__ not in _RMS_NORMS or not isinstance(w, torch.Tensor) or eps is None:
        return None
    if w.dtype not in (torch.bfloat16, torch.float32):
        return None
    return w.detach().to(torch.bfloat16), float(eps)


def _swiglu(gate_up: Callable, down: Callable, inter: int) -> Callable:
    """LLaMA's MLP, down(silu(gate(x)) · up(x)), with gate and up as one matmul (…, 2·inter)."""

    def mlp(x):
        gu = gate_up(x)
        return down(F.silu(gu[..., :inter]) * gu[..., inter:])

    return mlp
