"""Step 3 of the recipe: PPO against the reward model, with a per-token KL penalty to the SFT
model (InstructGPT §3.5 "Reinforcement learning"; the details follow Huang et al. 2024, "The N
Implementation Details of RLHF with PPO", and its code vwxyzjn/summarize_from_feedback_details).

Processes: one, or several under torchrun / accelerate launch: each process generates, scores and
forwards its share of the prompts; rewards, advantages and metrics are computed on the all-gathered
global batch and each step's gradients are summed over the processes, so N processes take the steps
one process takes (``ppo_processes.py``; tests/test_ppo_processes.py). The main process logs and
saves. Sampling differs: each process's engine draws one stream per call.

The models (each process; all forwards in the training precision, bf16 autocast by default):
  policy     the SFT model, trained (or LoRA adapters on it)
  reference  the frozen SFT model — with LoRA the same weights with the adapters disabled
  critic     a copy of the reward model whose scalar head is applied at every token
             (critic='rm'), or a value head on the policy trunk (critic='policy_head')
  reward     the reward model's normalised score at the last response token, or a Python
             ``reward_fn(prompts, responses, finished) -> list[float]``

Each iteration, numbered as in the algorithm:
  1. prompts       a seeded batch of prompts (the batch plan of the run, so resume is exact)
  2. generate      responses from the policy's current weights (rollout_backend: the engine, HF generate
                   or vLLM, which gets the weights pushed first)
  3. score         cut after the first EOS; RM score or reward_fn; score clipping; missing-EOS penalty;
                   optionally minus the leave-one-out mean of the prompt's other samples (score_baseline)
  4. forwards      log-probs of policy and reference and the critic's values, without grad, in
                   the training precision (the generator's log-probs are NOT reused for the ratio)
  5. rewards       r_t = −β (log π − log π_ref), plus the score on the last response token
  6. advantages    GAE(γ, λ), then whitened over the batch
  7. PPO           ppo_epochs × num_minibatches steps of policy loss + vf_coef · value loss
                   (+ ptx_coef · pretraining NLL), one global gradient-norm clip, AdamW
  8. log           KL controller update, metrics.jsonl line, checkpoint

``train_ppo`` reads top to bottom; each phase is a function of its own below it, in this order,
but for step 8 and the final save, shared with A2C, RLOO and GRPO: ``ppo_saving.py``. The models,
their loading and no-grad forwards (batch layout, critic, log-probs, scores) live in
``ppo_models.py``; the rollout and its sharing between processes in ``ppo_processes.py``; PPO-ptx's
corpus and loss in ``pretrain.py``; the math (GAE, KL, clipped losses) in ``rlhfkit/algos/ppo.py``.
The log-probs divide the logits by the sampling temperature [N-details, "scale the logits by the
sampling temperature"].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.algos.logprobs import logprobs_from_logits
from rlhfkit.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    clip_scores,
    compute_gae,
    compute_rewards,
    group_baseline,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    whiten_rewards,
)
from rlhfkit.config import PPOConfig
from rlhfkit.data.records import Prompt
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision
from rlhfkit.models.lora import unwrap
from rlhfkit.recipes.common import (
    MetricsLog,
    TimeBudget,
    batch_plan,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    prepare_out,
    progress,
    shard,
    world,
)
from rlhfkit.recipes.engines import engine, lockstep, prepare_models, sharded
from rlhfkit.recipes.ppo_models import (
    Batch,
    Models,
    cut_responses,
    load_models,
    make_batch,
    policy_forward,
    rm_scores,
    rollout_forwards,
)
from rlhfkit.recipes.ppo_processes import (
    Rollout,
    Share,
    backward,
    check_sharing,
    global_rollout,
    micro_batches,
    push_weights,
    sum_stats,
    take_step,
)
from rlhfkit.recipes.ppo_saving import log_and_checkpoint, save_final
from rlhfkit.recipes.pretrain import load_ptx, ptx_chunks, ptx_loss
from rlhfkit.rollout import Completion, SamplingParams

RewardFn = Callable[[list[Prompt], list[str], list[bool]], Sequence[float]]
RolloutMetrics = Callable[[list[Prompt], list[str], list[bool]], dict[str, float]]
# (cfg, logits, logprobs, old_logprobs, advantages, mask) -> (loss, {name: statistic}): ``clipped_policy_loss``
PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load_prompts(cfg: PPOConfig, say=print) -> list[Prompt]:
    if not cfg.data:
        from rlhfkit.tasks import load_task

        prompts = load_task("train")
        say(f"prompts: the built-in task's train split ({len(prompts)})")
    else:
        from rlhfkit.data.loaders import load_records

        fields = cfg.fields or None
        got = load_records(cfg.data, "prompt", fields=fields, split=cfg.split, skip_invalid=cfg.skip_invalid)
        say(got.summary())
        prompts = got.records
    return prompts[: cfg.limit] if cfg.limit else prompts


def _seed(*parts: int) -> int:
    """A seed derived from (run seed, iteration, …): the same draw on a resumed run."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**62)
    return seed


def _seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Advantages:
    """Per-token rewards and what GAE makes of them, all (N, R)."""

    beta: float  # the KL coefficient they were computed with
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class Optimization:
    """One AdamW over policy and critic (``modules``), its schedule, the KL controller, and the
    resident size of the first iteration (``log_and_checkpoint``'s memory housekeeping)."""

    optimizer: Any
    scheduler: Any
    trainable: list[nn.Parameter]
    kl_ctl: AdaptiveKLController | FixedKLController
    modules: nn.Module | None = None  # {"policy", "critic"}: what the optimizer's state is keyed by
    rss_base: float = 0.0


def train_ppo(
    cfg: PPOConfig, reward_fn: RewardFn | None = None, say=print, rollout_metrics: RolloutMetrics | None = None
) -> dict:
    """PPO on ``cfg.model`` against ``cfg.reward_model`` (or ``reward_fn``); returns final metrics.

    ``reward_fn(prompts, responses, finished) -> scores``: one float per response, given the
    Prompt records, the decoded responses (cut at EOS) and whether each one produced EOS.
    ``rollout_metrics(prompts, responses, finished) -> {name: value}``: task-specific numbers
    (e.g. ``rlhfkit.feedback.rubric.gold_metrics``) added to each iteration's metrics.
    Writes ``out/metrics.jsonl`` (one line per iteration), checkpoints, ``out/model`` (the
    policy, a plain Hugging Face directory, LoRA merged) and ``out/critic``.
    """
    check_config(cfg, reward_fn)
    acc = make_accelerator(cfg)
    rank, n_proc = world(acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    budget = TimeBudget(cfg, acc, say)  # cfg.max_seconds from here
    out, ckpt = prepare_out(cfg, acc)
    precision = resolve_precision(cfg.precision, acc.device)

    # 0. data first: a bad file is reported before minutes of model loading
    prompts = load_prompts(cfg, say)
    ptx_docs = load_ptx(cfg)
    # 1. models: policy (+ LoRA), reference, critic, reward model
    m = load_models(cfg, acc.device, precision, reward_fn, say, acc)
    # 2. prompts, batch plan (one batch of prompts per iteration), PPO-ptx corpus
    queries = encode_queries(cfg, prompts, m.tok, say)
    plan = batch_plan(len(prompts), cfg)
    check_sharing(len(plan[0]), n_proc, lockstep(acc))  # every process gets prompts (FSDP2: as many)
    ptx = ptx_chunks(cfg, ptx_docs, m.tok) if ptx_docs is not None else None
    say(
        f"PPO: {len(plan)} iterations x {min(cfg.batch_size, len(prompts))} prompts x {cfg.samples_per_prompt} "
        f"samples, critic={cfg.critic}, reward={'reward_fn' if reward_fn else cfg.reward_model}, {precision}"
        + (f", ptx {len(ptx)} chunks" if ptx else "")
    )
    # 3. optimizer over policy and critic, KL controller, resume
    opt, start = setup_optimization(cfg, m, len(plan), ckpt, say, acc)
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)

    bar = progress(len(plan), start, acc.is_main_process, "ppo")
    last: dict = {}
    t_run = time.perf_counter()
    for it in range(start, len(plan)):
        # 1. prompts of this iteration (each repeated samples_per_prompt times, prompt-major); with
        # several processes each takes a contiguous share of them (sft's ``shard``)
        idx = sum(shard(plan[it], rank, n_proc, 1), [])
        batch_prompts = [prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]
        batch_queries = [queries[i] for i in idx for _ in range(cfg.samples_per_prompt)]
        times = {"time_push": push_weights(m)}  # the policy's weights to the generator
        with timed(times, "time_generate"):  # 2. generate on the live weights
            completions = generate(m, cfg, [queries[i] for i in idx], it, idx)
        with timed(times, "time_score"):  # 3. cut after the first EOS, then score
            ro = score(m, cfg, batch_prompts, batch_queries, completions, reward_fn)
        with timed(times, "time_forward"):  # 4. log-probs (policy, reference) and values, no grad
            ro.fw = forwards(m, cfg, ro.batch)
        # the global batch: every process's rows, in prompt order (one process: ro itself)
        whole, share = global_rollout(acc, ro, [p for i in plan[it] for p in [prompts[i]] * cfg.samples_per_prompt])
        # 5.-6. per-token rewards with the KL penalty, GAE advantages and returns, over the global batch
        adv = rewards_and_advantages(cfg, whole, opt.kl_ctl.value)
        with timed(times, "time_train"):  # 7. PPO epochs over minibatches
            stats = update(m, cfg, ro, adv, opt, it, ptx, share)
        # 8. KL controller, metrics, memory, checkpoint
        extra = rollout_metrics(whole.prompts, whole.texts, whole.ended.tolist()) if rollout_metrics else {}
        last = log_and_checkpoint(cfg, it + 1, len(plan), m, whole, adv, opt, stats | extra, times, log, out, acc)
        bar.update(1)
        bar.set_postfix(score=f"{last['score']:.3f}", kl=f"{last['kl']:.3f}")
        if budget.spent(it + 1, len(plan)):
            break
    bar.close()
    log.close()
    result = {"step": len(plan), **last, "train_seconds": time.perf_counter() - t_run, **budget.result()}
    save_final(cfg, m, opt, budget.steps(len(plan)), out, last, say, acc)
    acc.wait_for_everyone()
    return result


def check_config(cfg: PPOConfig, reward_fn: RewardFn | None) -> None:
    """The config errors PPO can tell before loading anything (PPOConfig checked its Literal fields)."""
    if reward_fn is None and not cfg.reward_model:
        raise UserError("reward_model=…: PPO needs a reward model directory (or a reward_fn from Python)")
    if cfg.score_baseline == "group" and cfg.samples_per_prompt < 2:
        raise UserError("score_baseline=group compares the samples of one prompt: set samples_per_prompt >= 2")
    if cfg.num_minibatches < 1 or cfg.ppo_epochs < 1:
        raise UserError("num_minibatches and ppo_epochs must be >= 1")


def encode_queries(cfg: PPOConfig, prompts: list[Prompt], tok, say=print) -> list[list[int]]:
    """Each prompt's chat-formatted token ids, its last ``max_prompt_length`` tokens."""
    queries = [encode_prompt(tok, p.messages) for p in prompts]
    cut = sum(len(q) > cfg.max_prompt_length for q in queries)
    if cut:
        say(f"{cut} prompts longer than max_prompt_length={cfg.max_prompt_length} keep their last tokens")
    return [q[-cfg.max_prompt_length :] for q in queries]


def setup_optimization(cfg: PPOConfig, m: Models, n_iterations: int, ckpt: Path | None, say=print, acc=None):
    """One AdamW over policy and critic (one gradient clip), the KL controller, and the state of a
    resumed run (FSDP2: each process keeps its shards of it). Returns (Optimization, the iteration to start at)."""
    both = nn.ModuleDict({"policy": m.policy, "critic": m.critic})
    n_updates = n_iterations * cfg.ppo_epochs * cfg.num_minibatches
    head = m.critic.head.weight if m.critic.kind == "policy_head" else None
    head_lr = {head: cfg.value_head_lr} if head is not None and cfg.value_head_lr > 0 else None
    optimizer, scheduler = make_optimizer(both, cfg, n_updates, lr_of=head_lr)
    if cfg.adaptive_kl:
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)
    start = 0
    if ckpt is not None:
        start, extra = load_checkpoint(ckpt, m.policy, optimizer, scheduler, acc, prepared=both)
        m.critic.load(ckpt / "model" / "critic", on_shards=acc is not None and sharded(acc))
        kl_ctl.load_state_dict(extra["kl_ctl"])
        say(f"resumed from {ckpt} at iteration {start}")
    trainable = [p for p in both.parameters() if p.requires_grad]
    if acc is not None and engine(acc) == "deepspeed":
        # one DeepSpeed engine over policy and critic (one optimizer, one clip), partitioned in place:
        # m.policy and m.critic stay the modules the loop calls; accelerate sizes DeepSpeed's
        # buckets from ``config.hidden_size``, which a ModuleDict lacks: the policy's
        both.config = unwrap(m.policy).config
        both, optimizer = prepare_models(acc, cfg, both, optimizer)
    return Optimization(optimizer, scheduler, trainable, kl_ctl, both), start


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Adds the seconds the block took to ``times[name]``."""
    t0 = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def generate(
    m: Models, cfg: PPOConfig, queries: list[list[int]], it: int, keys: list[int] | None = None
) -> list[Completion]:
    """``samples_per_prompt`` responses to each query from the live policy weights, with the rollout
    generator (rollout_backend). Each prompt has its own seed, from (run seed, iteration, its key:
    its index in the data set, ``keys``; default its position), and each of its samples its own
    stream of it (``SamplingParams.seed``): a resumed run samples the same, and a prompt samples
    the same whichever process generates it, next to whichever others."""
    keys = range(len(queries)) if keys is None else keys
    params = [
        SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            ignore_eos=cfg.ignore_eos,
            seed=_seed(cfg.seed, it, 7, k),
        )
        for k in keys
    ]
    with torch.no_grad():
        return m.generator.generate(queries, params, n=cfg.samples_per_prompt)


def score(
    m: Models,
    cfg: PPOConfig,
    prompts: list[Prompt],
    queries: list[list[int]],
    completions: list[Completion],
    reward_fn: RewardFn | None,
) -> Rollout:
    """Cut each response after its first EOS, score it (reward model or ``reward_fn``), clip the
    scores, penalise a missing EOS, and with score_baseline=group subtract the leave-one-out mean of
    the prompt's other samples."""
    pad_id = m.tok.pad_token_id
    # the one place rollout data enters the device: every later tensor follows the batch's
    response, response_mask, ended = cut_responses(completions, m.generator.eos_ids, pad_id, m.device)
    batch = make_batch(queries, response, response_mask, pad_id)
    texts = [m.tok.decode(r[k].tolist(), skip_special_tokens=True) for r, k in zip(batch.response, batch.response_mask)]
    if reward_fn is not None:
        raw = torch.tensor(
            [float(s) for s in reward_fn(prompts, texts, ended.tolist())], dtype=torch.float32, device=m.device
        )
        if raw.shape != (len(texts),):
            got = raw.shape[0] if raw.dim() else "a scalar"
            raise UserError(f"reward_fn returned {got} scores for {len(texts)} responses")
    else:
        raw = rm_scores(m.rm, batch, cfg.forward_batch_size, m.autocast)
    scores = clip_scores(raw, cfg.score_clip) if cfg.score_clip > 0 else raw
    if cfg.missing_eos_penalty is not None:
        scores = apply_missing_eos_penalty(scores, ended, cfg.missing_eos_penalty)
    penalised = scores  # what is logged as "score": the baseline only centres it per prompt
    if cfg.score_baseline == "group":
        scores = group_baseline(scores, cfg.samples_per_prompt)
    return Rollout(prompts, batch, texts, ended, raw, penalised, scores)


def forwards(m: Models, cfg: PPOConfig, batch: Batch, with_policy: bool = True) -> dict[str, torch.Tensor]:
    """Log-probs and entropy of the policy (unless ``with_policy=False``), log-probs of the reference,
    values of the critic: no grad, logits / temperature, in the training precision (the generator's
    log-probs are not reused)."""
    return rollout_forwards(
        m.policy, m.ref, m.critic, batch, cfg.temperature, cfg.forward_batch_size, m.autocast, m.ref is None,
        with_policy,
    )  # fmt: skip


def rewards_and_advantages(cfg: PPOConfig, ro: Rollout, beta: float) -> Advantages:
    """r_t = −β (log π − log π_ref) on every token plus the score on the last one (optionally
    whitened); GAE(γ, λ) advantages and returns; advantages whitened over the batch."""
    mask = ro.batch.response_mask
    rewards, kl = compute_rewards(ro.scores, ro.fw["logprobs"], ro.fw["ref_logprobs"], mask, beta)
    if cfg.whiten_rewards:
        rewards = whiten_rewards(rewards, mask)
    advantages, returns = compute_gae(rewards, ro.fw["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Advantages(beta, rewards, kl, advantages, returns)


def update(
    m: Models,
    cfg: PPOConfig,
    ro: Rollout,
    adv: Advantages,
    opt: Optimization,
    it: int,
    ptx: list[list[int]] | None,
    share: Share | None = None,
    policy_loss: PolicyLoss | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` passes over seeded minibatches of the global batch: per minibatch the
    token-weighted policy and value losses of its micro-batches (+ ``ptx_coef`` · pretraining
    NLL), one gradient clip, one AdamW step. Returns the per-step means of the losses and diagnostics.

    ``ro`` is this process's rows, ``adv`` the global batch's (``share``: where ``ro``'s rows are in
    it; None: one process, ``ro`` is the global batch). Each process runs the micro-batches of its
    rows of each minibatch, weighted by the minibatch's global token count; the gradients are then
    summed over the processes, so N processes take the step one process would. The PPO-ptx term
    is the main process's. ``policy_loss``: PPO's ``clipped_policy_loss`` (None) or A2C's (recipes/a2c.py)."""
    share = share or Share(None, 0, ro.batch.response_mask)
    batch, mask = ro.batch, share.mask
    N, n_local = mask.shape[0], len(ro.texts)
    local_adv = Advantages(
        adv.beta,
        *(x[share.offset : share.offset + n_local] for x in (adv.rewards, adv.kl, adv.advantages, adv.returns)),
    )
    mb_size = math.ceil(N / cfg.num_minibatches)
    stats: dict[str, list[float]] = {}
    for epoch in range(cfg.ppo_epochs):
        # drawn by a CPU generator (the same permutation on any device), moved once to the batch's
        perm = torch.randperm(N, generator=_seeded(cfg.seed, it, epoch, 11), device="cpu").to(mask.device)
        for k, mb_start in enumerate(range(0, N, mb_size)):
            mb = perm[mb_start : mb_start + mb_size]
            n_tokens = mask[mb].sum()
            mine = share.mine(mb, n_local)  # this process's rows of the minibatch, local indices
            with_ptx = ptx is not None and (share.main or share.lockstep)
            chunks = micro_batches(share, batch, mine, cfg.grad_accum)  # rows of similar length
            for j, (rows, real) in enumerate(chunks):
                last = j == len(chunks) - 1 and not with_ptx  # DeepSpeed steps after the minibatch's last backward
                micro_step(m, cfg, ro, local_adv, rows, n_tokens, stats, policy_loss, real, share, last)
            if with_ptx:
                g = _seeded(cfg.seed, it, epoch, k, 13)
                order = torch.randperm(len(ptx), generator=g, device="cpu")[: cfg.ptx_batch_size]  # Python indices
                with m.autocast():
                    nll = ptx_loss(m.policy, [ptx[i] for i in order.tolist()], m.tok.pad_token_id)
                # the main process's term; in lockstep every process runs it, a 1/n share each
                share_of = 1 / share.acc.num_processes if share.lockstep else 1.0
                backward(share, share_of * cfg.ptx_coef * nll, last=True)
                if share.main:
                    stats.setdefault("ptx_loss", []).append(nll.item())
            grad_norm = take_step(share, opt.optimizer, opt.trainable, cfg.max_grad_norm)
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            if grad_norm is not None and share.main:
                stats.setdefault("grad_norm", []).append(float(grad_norm))
    # per-step means (token-weighted over micro-batches, then averaged over the optimizer steps),
    # of every process's sums and counts
    n_steps = cfg.ppo_epochs * math.ceil(N / mb_size)
    sums = sum_stats(share, stats, UPDATE_STATS)
    return {name: s / n_steps if name not in ("ptx_loss", "grad_norm") else s / c for name, (s, c) in sums.items()}


UPDATE_STATS = ["policy_loss", "clipfrac", "approx_kl", "value_loss", "value_clipfrac", "ratio_mean"]
UPDATE_STATS += ["pg_loss", "ptx_loss", "grad_norm"]  # what ``update`` logs (pg_loss: A2C with an entropy bonus)


def micro_step(
    m: Models,
    cfg: PPOConfig,
    ro: Rollout,
    adv: Advantages,
    rows: torch.Tensor,
    n_tokens: torch.Tensor,
    stats: dict[str, list[float]],
    policy_loss: PolicyLoss | None = None,
    real: bool = True,
    share: Share | None = None,
    last: bool = True,
) -> None:
    """Forward and backward of the policy loss (``clipped_policy_loss``, or A2C's) and the value loss
    on ``rows``, weighted by their share of the minibatch's ``n_tokens`` (so micro-batching leaves the
    loss unchanged); the weighted losses and diagnostics are appended to ``stats``. ``real=False``: a
    lockstep filler (``micro_batches``), run with weight 0 and not logged. ``share``/``last``: see
    ``ppo_processes.backward``."""
    policy_loss = policy_loss or clipped_policy_loss
    share = share or Share(None, 0, ro.batch.response_mask)
    b = ro.batch.rows(rows)
    cols = b.response.shape[1]
    m_mask = b.response_mask
    weight = m_mask.sum() / n_tokens if real else torch.zeros((), device=m_mask.device)
    old_lp, advantages = ro.fw["logprobs"][rows, :cols], adv.advantages[rows, :cols]
    old_v, ret = ro.fw["values"][rows, :cols], adv.returns[rows, :cols]
    if m.critic.kind == "rm":
        # separate models, separate graphs: the critic's forward + backward first, then the
        # policy's, so only one graph (and one bf16 weight cast) is alive. Under DeepSpeed one
        # backward of both: ZeRO-3 copies each gradient partition in a step's first backward and adds
        # in the later ones, so a first backward without the policy's gradients would add them to the
        # last step's (DeepSpeed 0.19's stage3.partition_grads)
        with m.autocast():
            values = m.critic.values(b)
        vl = ppo_value_loss(values, old_v, ret, m_mask, cfg.cliprange_value)
        value_term = weight * cfg.vf_coef * vl.loss
        if not share.deepspeed:
            backward(share, value_term, last=False)
        with m.autocast():
            _, logits = policy_forward(m.policy, b)  # (b, r, V)
            new_logprobs = logprobs_from_logits(logits, b.response, cfg.temperature)
        pl, parts = policy_loss(cfg, logits, new_logprobs, old_lp, advantages, m_mask)
        backward(share, weight * pl + value_term if share.deepspeed else weight * pl, last)
    else:  # one trunk forward gives both the log-probs and the values
        with m.autocast():
            h, logits = policy_forward(m.policy, b)  # (b, r, d), (b, r, V)
            new_logprobs = logprobs_from_logits(logits, b.response, cfg.temperature)
            values = m.critic.values(b, hidden=h)
        pl, parts = policy_loss(cfg, logits, new_logprobs, old_lp, advantages, m_mask)
        vl = ppo_value_loss(values, old_v, ret, m_mask, cfg.cliprange_value)
        backward(share, weight * (pl + cfg.vf_coef * vl.loss), last)
    if not real:
        return
    w = weight.item()
    parts |= {"value_loss": vl.loss} | ({"value_clipfrac": vl.clipfrac} if cfg.cliprange_value is not None else {})
    for name, v in parts.items():
        stats.setdefault(name, []).append(w * v.item())


def clipped_policy_loss(cfg: PPOConfig, logits, logprobs, old_logprobs, advantages, mask):
    """PPO's clipped surrogate (``ppo_policy_loss``, [PPO] eq. 7) of a micro-batch: the loss and the
    statistics to log. ``logits`` (b, r, V) are unused here; A2C's loss takes its entropy from them."""
    pl = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.cliprange)
    parts = {"policy_loss": pl.loss, "clipfrac": pl.clipfrac, "approx_kl": pl.approx_kl, "ratio_mean": pl.ratio_mean}
    return pl.loss, parts
