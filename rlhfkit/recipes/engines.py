"""The engines a recipe runs under — one process, DDP, FSDP2, DeepSpeed ZeRO-2/3 — and what each
means for a training step: which ones accelerate starts and which we refuse (``_check_engine``),
whether parameters are sharded or forwards must run in lockstep, clipping and stepping, preparing
models, gradient synchronisation per micro-batch, and gathering whole weights (docs/distributed.md).

The launcher picks the engine (accelerate's environment variables, from ``accelerate launch
--config_file examples/accelerate/<engine>.yaml``); the stages ask these helpers what it means for
them: ``sharded`` (no process holds whole parameters: clip, save and checkpoint through gathers),
``lockstep`` (every forward is a collective: each process must run the same number of them).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from rlhfkit.accel.optim import clip_and_step
from rlhfkit.config import ILQLConfig, TrainConfig
from rlhfkit.errors import UserError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _check_engine(acc, cfg: TrainConfig) -> None:
    """Turn FSDP2 on for CPU processes, and refuse what we do not run.

    accelerate 1.16 turns FSDP on only for accelerator devices (``AcceleratorState``: GPU, XPU, …);
    on CPUs it silently trains with DDP instead. FSDP2 (``fully_shard``) itself runs on CPUs over gloo,
    and accelerate's ``prepare`` shards a model there once the state says FSDP — so we say it here, and
    the same launch command shards on CPUs (where the tests run it) as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if _env_flag("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise UserError("FSDP version 1 is not supported: set fsdp_version: 2 (examples/accelerate/fsdp2.yaml)")
        on_cpu = acc.device.type == "cpu" and acc.num_processes > 1
        if on_cpu and (acc.distributed_type != DistributedType.FSDP or getattr(acc.state, "fsdp_plugin", None) is None):
            from accelerate.state import PartialState

            acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate does
            acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and acc.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(
            "DeepSpeed runs only on CUDA GPUs here (accelerate does not start it on CPUs): "
            "on CPUs use examples/accelerate/fsdp2.yaml or ddp.yaml"
        )
    if engine(acc) == "deepspeed" and not acc.state.deepspeed_plugin.zero3_init_flag:
        # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and
        # from_pretrained then loads ZeRO-3 models already partitioned; with the flag off, models load
        # whole (as in one process: the reward head's init, the CPU probes) and are partitioned in prepare
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if engine(acc) == "deepspeed" and (cfg.save_every or cfg.resume):
        raise UserError("checkpoints (save_every, resume) under DeepSpeed are not supported: use FSDP2 or DDP")
    if sharded(acc) and isinstance(cfg, ILQLConfig):
        raise UserError(
            f"ilql does not run under {engine(acc)} yet (its heads and their Polyak targets are saved from whole "
            "weights): launch it with DDP (examples/accelerate/ddp.yaml)"
        )
    if sharded(acc) and cfg.lora:
        raise UserError(
            f"lora=true with {engine(acc)}: not supported (the merged save needs whole weights); "
            "use DDP (examples/accelerate/ddp.yaml) or train all weights"
        )


def engine(acc) -> str:
    """``fsdp``, ``deepspeed``, ``ddp`` (several processes, whole parameters each) or ``single``."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def sharded(acc) -> bool:
    """No process holds whole parameters or gradients (FSDP, DeepSpeed ZeRO)."""
    return engine(acc) in ("fsdp", "deepspeed")


def lockstep(acc) -> bool:
    """Every forward gathers the parameters, a collective: every process must run the same number of
    forwards (FSDP; DeepSpeed ZeRO-3). Under DDP a forward is local, only a backward synchronises."""
    return sharded(acc)


def check_batch(acc, cfg: TrainConfig, n_examples: int) -> None:
    """Each process needs examples; in lockstep, the same number of them (the same micro-batches)."""
    n_proc = acc.num_processes
    bs = min(cfg.batch_size, n_examples)
    if cfg.batch_size < n_proc:
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {n_proc} processes")
    if bs < n_proc:
        raise UserError(f"{n_examples} training examples are fewer than the {n_proc} processes")
    if lockstep(acc) and bs % n_proc:
        raise UserError(f"batch_size={bs}: under {engine(acc)} it must be a multiple of the {n_proc} processes")


def optimizer_step(acc, model, optimizer, max_norm: float):
    """Clip the gradients of ``model`` (a module, or a list of parameters) to a global L2 norm of
    ``max_norm`` (0: no clipping) and step.
    Returns the norm before clipping (None without clipping).

    Whole gradients (1 process, DDP): ``clip_and_step``, the fused CPU path. Sharded: a process holds
    a shard of each gradient, and the norm must be that of the whole: accelerate's ``clip_grad_norm_``
    (FSDP: the DTensor norm, all-reduced; DeepSpeed: its engine clips, by ``gradient_clipping``,
    which ``prepare_models`` sets to ``max_grad_norm``, and reports the norm)."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    if not sharded(acc):
        return clip_and_step(optimizer, params, max_norm)
    norm = acc.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
    optimizer.step()
    if hasattr(norm, "full_tensor"):  # a DTensor
        norm = norm.full_tensor()
    return None if norm is None else torch.as_tensor(norm)


def prepare_models(acc, cfg: TrainConfig, model, optimizer):
    """``acc.prepare(model, optimizer)``. DeepSpeed (untested here: GPUs only): its engine clips with
    ``cfg.max_grad_norm``; it accumulates our micro-batches itself (``micro_batch``), so its own
    accumulation count is 1; its micro-batch size only labels its logs (we pass no dataloader)."""
    if engine(acc) == "deepspeed":
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["gradient_clipping"] = cfg.max_grad_norm
        ds["gradient_accumulation_steps"] = 1
        ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // acc.num_processes // max(1, cfg.grad_accum))
        ds.pop("train_batch_size", None)  # DeepSpeed derives it
    return acc.prepare(model, optimizer)


@contextmanager
def micro_batch(acc, model, last: bool):
    """Around the forward and backward of one micro-batch: gradients are synchronised (all-reduced,
    reduce-scattered) after the ``last`` one of an optimizer step only. DDP and FSDP: ``no_sync``
    before it. DeepSpeed: its engine takes the optimizer step in ``acc.backward`` at the accumulation
    boundary, which accelerate's ``sync_gradients`` marks (ZeRO-2/3 have no ``no_sync``)."""
    if engine(acc) == "deepspeed":
        acc.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            acc.gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with acc.no_sync(model):
            yield


def full_state_dict(acc, model, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The whole weights of the prepared ``model`` (those under ``prefix``, renamed without it) on
    the main process, None on the others. Sharded: gathered, a collective every process must call."""
    if not sharded(acc):
        return None
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    # a tied weight (the LM head of tie_word_embeddings) is one parameter under two names; the
    # gathered copies no longer share memory, so save_pretrained would write both: keep the first
    unwrapped = acc.unwrap_model(model)
    first = {n for n, _ in unwrapped.named_parameters()}
    aliases = {n for n, _ in unwrapped.named_parameters(remove_duplicate=False)} - first
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k not in aliases}
