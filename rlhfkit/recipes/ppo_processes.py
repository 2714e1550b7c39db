"""The rollout of one iteration, and how several processes share it (PPO, A2C, RLOO, GRPO).

Processes: one, or several under torchrun / accelerate launch (gloo on CPU, NCCL on GPUs). Each
process generates, scores and forwards its contiguous share of an iteration's prompts (whole
prompts: the k samples of a prompt stay on one process, so group baselines see their group);
``global_rollout`` all-gathers the rows in rank (= prompt) order into the global batch, on which
every process computes the rewards, advantages, the KL controller's update and the metrics, alike
and as one process would. Each optimizer step's minibatch is a global one: a process
back-propagates its rows of it, weighted by the minibatch's global size, ``sum_gradients`` adds
the gradients up, and every process takes the one clipped step one process would take
(tests/test_ppo_processes.py, tests/test_rl_processes.py). ``sum_stats`` does the same for the
logged losses. One process: every function here is the identity or a plain sum.

Under FSDP2 (``accelerate launch --config_file examples/accelerate/fsdp2.yaml``) the trained models
— policy and critic — are sharded (``ppo_models.shard_trained``): a process holds a part of their
parameters, gradients and AdamW moments. Three things change. The rollout generator needs whole
weights: it samples from a whole copy of the policy into which ``push_weights`` gathers the shards
each iteration (as weights are pushed into vLLM). Every forward of a sharded model gathers its
parameters, a collective: all processes run the same forwards (``lockstep``), so each runs as many
micro-batches as the process with the most (``micro_batches``; the extra ones weigh 0). And FSDP2
reduces the gradients itself, in each backward, as a mean (``take_step`` turns it back into the sum,
then clips by the global norm of the shards). The frozen reference and reward model stay whole on each process.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlhfkit.accel.optim import clip_and_step
from rlhfkit.data.records import Prompt
from rlhfkit.errors import UserError
from rlhfkit.recipes.engines import engine, lockstep, optimizer_step
from rlhfkit.recipes.ppo_models import Batch, Models, length_chunks


@dataclass
class Rollout:
    """One iteration's samples: N = prompts × samples_per_prompt rows, prompt-major."""

    prompts: list[Prompt]  # (N) the Prompt record of each row
    batch: Batch  # query + response rows, cut after the first EOS
    texts: list[str]  # (N) decoded responses
    ended: torch.Tensor  # (N,) bool: the response produced EOS
    raw: torch.Tensor  # (N,) RM score or reward_fn value
    penalised: torch.Tensor  # (N,) clipped, missing-EOS penalty applied: logged as "score"
    scores: torch.Tensor  # (N,) what the rewards get: penalised, minus the group baseline if any
    fw: dict[str, torch.Tensor] = field(default_factory=dict)  # no-grad forwards, each (N, R)


@dataclass
class Share:
    """This process's rows of the iteration's global batch (rows ``offset … offset + n_local - 1``
    of ``mask``'s N): what an update needs to take the global minibatches' local part."""

    acc: Any  # the accelerator (None: one process)
    offset: int
    mask: torch.Tensor  # (N, R) the global batch's response mask

    @property
    def several(self) -> bool:
        return self.acc is not None and self.acc.num_processes > 1

    @property
    def main(self) -> bool:
        return not self.several or self.acc.is_main_process

    @property
    def lockstep(self) -> bool:
        """Sharded models (FSDP2, DeepSpeed): every process must run the same forwards and backwards."""
        return self.several and lockstep(self.acc)

    @property
    def deepspeed(self) -> bool:
        """Policy and critic in one DeepSpeed engine: it reduces, clips and steps (``backward``)."""
        return self.several and engine(self.acc) == "deepspeed"

    def mine(self, rows: torch.Tensor, n_local: int) -> torch.Tensor:
        """This process's rows among the global ``rows``, as indices into its own batch."""
        return rows[(rows >= self.offset) & (rows < self.offset + n_local)] - self.offset


def check_sharing(batch_size: int, n_proc: int, even: bool = False) -> None:
    """Refuse a batch of prompts that leaves a process without one: each process takes a contiguous
    share of ⌈B/n⌉ prompts (``recipes.common.shard``), so 5 prompts on 4 processes leave the last none.
    ``even`` (FSDP2: the no-grad forwards run in lockstep): the shares must be equal."""
    per = math.ceil(batch_size / n_proc)
    if (n_proc - 1) * per >= batch_size or (even and batch_size % n_proc):
        raise UserError(
            f"batch_size={batch_size} prompts cannot be shared by {n_proc} processes (shares of {per} leave the "
            f"last one {'none' if (n_proc - 1) * per >= batch_size else 'fewer'}): use a multiple of {n_proc}"
        )


def micro_batches(share: Share, batch: Batch, mine: torch.Tensor, grad_accum: int) -> list[tuple[torch.Tensor, bool]]:
    """This process's rows of a minibatch (``mine``) in ``grad_accum`` micro-batches of rows of similar
    length (``length_chunks``: less padding, same loss), each with True. In lockstep (FSDP2) as many
    as the process with the most: the extra ones are (row 0, False), to be run with weight 0."""
    size = math.ceil(len(mine) / max(1, min(grad_accum, len(mine))))
    chunks = [(rows, True) for rows in length_chunks(batch, mine, size)] if len(mine) else []
    if not share.lockstep:
        return chunks
    import torch.distributed as dist

    most = torch.tensor([len(chunks)], device=share.mask.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    filler = torch.zeros(1, dtype=torch.long, device=share.mask.device)
    return chunks + [(filler, False)] * (int(most) - len(chunks))


def backward(share: Share, loss: torch.Tensor, last: bool) -> None:
    """``loss.backward()``. Under DeepSpeed the engine's backward instead, which reduces the gradients
    over the processes as it goes; after the ``last`` one of a minibatch it clips (its
    ``gradient_clipping``: ``max_grad_norm``) and steps (accelerate's ``sync_gradients`` marks it).
    DeepSpeed averages over the processes and each process's loss is already weighted by its rows'
    share of the global minibatch, so the loss is scaled by their number: the sum, as one process."""
    if not share.deepspeed:
        loss.backward()
        return
    acc = share.acc
    ds = acc.deepspeed_engine_wrapped.engine
    if hasattr(ds.optimizer, "clear_backward_seen_flag"):
        # what the engine's own forward does first, which the loop never calls (it calls the engine's
        # modules): ZeRO counts the backwards of a step here; without it ZeRO-3 (DeepSpeed 0.19)
        # overwrites the gradients of the earlier backwards instead of adding them up
        ds.optimizer.clear_backward_seen_flag()
    acc.gradient_state._set_sync_gradients(last)
    try:
        acc.backward(loss * acc.num_processes)
    finally:
        acc.gradient_state._set_sync_gradients(True)


def take_step(share: Share, optimizer, trainable: list[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """One optimizer step on the gradients of every process: summed here (``sum_gradients``), or by
    FSDP2's reduce-scatter in each backward (sharded; it averages), then clipped to a global L2 norm of ``max_norm``
    (``engines.optimizer_step``: the norm of the whole gradient, whichever way it is held). Returns
    the norm before clipping (None without clipping). DeepSpeed stepped in the last ``backward``:
    its norm."""
    if share.deepspeed:
        norm = share.acc.deepspeed_engine_wrapped.engine.get_global_grad_norm() if max_norm > 0 else None
        return None if norm is None else torch.as_tensor(float(norm))
    if share.lockstep:
        # FSDP2 averaged the gradients over the processes (gloo has no pre-multiplied sum); each
        # process's loss is already weighted by its rows' share of the global minibatch: the sum
        for p in trainable:
            if p.grad is not None:
                p.grad.mul_(share.acc.num_processes)
    elif share.several:
        sum_gradients(trainable)
    if share.acc is None:
        return clip_and_step(optimizer, trainable, max_norm)
    return optimizer_step(share.acc, trainable, optimizer, max_norm)


def gather_rows(acc, t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` (n_p, …) concatenated in rank order; the columns of a 2-d
    ``t`` are padded with zeros (False) to the widest. One process: ``t`` itself."""
    if acc.num_processes == 1:
        return t
    import torch.distributed as dist

    dtype = t.dtype
    x = t.to(torch.uint8) if dtype == torch.bool else t  # gloo gathers no bool
    shape = torch.tensor([x.shape[0], x.shape[1] if x.dim() > 1 else 1], device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(acc.num_processes)]
    dist.all_gather(shapes, shape)
    n_max, c_max = (max(int(s[j]) for s in shapes) for j in (0, 1))
    pad = (0, c_max - x.shape[1], 0, n_max - x.shape[0]) if x.dim() > 1 else (0, n_max - x.shape[0])
    x = torch.nn.functional.pad(x, pad)
    parts = [torch.empty_like(x) for _ in range(acc.num_processes)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)]).to(dtype)


def global_rollout(acc, ro: Rollout, prompts: list[Prompt]) -> tuple[Rollout, Share]:
    """The iteration's global batch — every process's rows of ``ro`` in rank (= prompt) order,
    responses padded to the longest — and this process's share of it. Rewards, advantages (their
    whitening), the KL controller and the metrics are computed on it, alike on every process and
    as one process would. ``input_ids`` of the global batch are padded with 0 (unused there)."""
    if acc.num_processes == 1:
        return ro, Share(acc, 0, ro.batch.response_mask)
    import torch.distributed as dist

    b = ro.batch
    batch = Batch(*(gather_rows(acc, x) for x in (b.input_ids, b.attention_mask, b.positions, b.response)),
                  gather_rows(acc, b.response_mask), gather_rows(acc, b.last_index))  # fmt: skip
    texts: list[list[str]] = [[] for _ in range(acc.num_processes)]
    dist.all_gather_object(texts, ro.texts)
    sizes = [len(x) for x in texts]
    whole = Rollout(
        prompts,
        batch,
        [t for part in texts for t in part],
        gather_rows(acc, ro.ended),
        gather_rows(acc, ro.raw),
        gather_rows(acc, ro.penalised),
        gather_rows(acc, ro.scores),
        {k: gather_rows(acc, v) for k, v in ro.fw.items()},
    )
    return whole, Share(acc, sum(sizes[: acc.process_index]), batch.response_mask)


def sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes (a process without one adds zeros; a
    parameter no process has a gradient for keeps none, as with one process)."""
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


@torch.no_grad()
def gather_into(sharded: nn.Module, whole: nn.Module) -> None:
    """Copy each parameter of the sharded ``sharded`` — FSDP2's DTensors, DeepSpeed ZeRO-3's partitions
    (ZeRO-2's are whole) — all-gathered (a collective: every process calls it), into the parameter of
    the same name of ``whole``, a plain copy of the same model."""
    from torch.distributed.tensor import DTensor

    def plain(name: str) -> str:  # the names of activation-checkpointing and compile wrappers
        return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")

    target = {plain(n): p for n, p in whole.named_parameters()}
    params = list(sharded.named_parameters())
    gathered = nullcontext()
    if any(hasattr(p, "ds_tensor") for _, p in params):  # ZeRO-3: each process holds a partition
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in params])
    with gathered:
        for name, p in params:
            target[plain(name)].copy_(p.full_tensor() if isinstance(p, DTensor) else p)


def push_weights(m: Models) -> float:
    """Make the generator sample from the policy's current weights; returns the seconds it took.
    FSDP2: the shards are gathered into the whole copy the generator samples from (``m.whole``)."""
    if m.whole is None:
        return m.generator.push_weights(m.policy)  # 0.0 for the engine and HF generate: the live module
    t0 = time.perf_counter()
    gather_into(m.policy, m.whole)
    return time.perf_counter() - t0 + m.generator.push_weights(m.whole)


def sum_stats(share: Share, stats: dict[str, list[float]], names: list[str]) -> dict[str, tuple[float, int]]:
    """(sum, count) of each statistic's values over every process, for the names of ``names``
    (the same list on every process); a statistic no process recorded is left out."""
    if not share.several:
        return {n: (sum(v), len(v)) for n, v in stats.items() if v}
    import torch.distributed as dist

    both = [[sum(stats.get(n, [])), len(stats.get(n, []))] for n in names]
    both = torch.tensor(both, dtype=torch.float64, device=share.mask.device)
    dist.all_reduce(both)
    return {n: (float(s), int(c)) for n, (s, c) in zip(names, both.tolist()) if c}
