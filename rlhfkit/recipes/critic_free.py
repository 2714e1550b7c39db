"""RLOO and GRPO: critic-free policy gradients on PPO's phases (``rlhfkit/recipes/ppo.py``).

An iteration is PPO's without the critic: 1. prompts, 2. generate k = samples_per_prompt
responses each, 3. score, 4. no-grad forwards (policy and reference log-probs, no values; GRPO
with one epoch over one minibatch: the reference's only, π_old is the training pass's) — the same
functions — then, instead of GAE and the value loss:

  RLOO [Ahmadian et al. 2024]  5. R_i = score_i − β Σ_t (log π − log π_ref) (the KL in the reward)
                               6. A_i = R_i − mean of the other k−1 samples' R (eq. 5), on every token
                               7. the clipped ratio of the whole sequence (REINFORCE on responses;
                                  TRL's RLOOTrainer's loss), a mean over the sequences
  GRPO [Shao et al. 2024]      5.-6. Â_i = (score_i − group mean) / (group std + 1e-4)
                               7. clipped ratio − β · k3 KL to the reference, in the loss (eq. 3),
                                  a mean over each sequence's tokens, then over the sequences

The math is in ``rlhfkit/algos/critic_free.py``. Several processes as PPO (``ppo_processes.py``):
each process samples its contiguous share of the prompts — all k samples of a prompt on one
process — the groups' baselines are taken on the all-gathered global batch, and each step's
gradients are summed over the processes (tests/test_rl_processes.py: 2 processes take 1's steps).
Writes what PPO writes, without ``out/critic``.
"""

from __future__ import annotations

import math
import time

import torch

from rlhfkit.algos.critic_free import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from rlhfkit.algos.logprobs import logprobs_and_entropy, logprobs_from_logits
from rlhfkit.algos.ppo import compute_rewards
from rlhfkit.config import GRPOConfig, RLOOConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision
from rlhfkit.recipes.common import (
    MetricsLog,
    TimeBudget,
    batch_plan,
    make_accelerator,
    prepare_out,
    progress,
    shard,
    world,
)
from rlhfkit.recipes.engines import lockstep
from rlhfkit.recipes.ppo import (
    Advantages,
    Models,
    Optimization,
    RewardFn,
    Rollout,
    RolloutMetrics,
    _seeded,
    check_config,
    encode_queries,
    forwards,
    generate,
    load_models,
    load_prompts,
    score,
    setup_optimization,
    timed,
)
from rlhfkit.recipes.ppo_models import policy_forward
from rlhfkit.recipes.ppo_processes import (
    Share,
    backward,
    check_sharing,
    gather_rows,
    global_rollout,
    micro_batches,
    push_weights,
    sum_stats,
    take_step,
)
from rlhfkit.recipes.ppo_saving import log_and_checkpoint, save_final


def train_rloo(
    cfg: RLOOConfig, reward_fn: RewardFn | None = None, say=print, rollout_metrics: RolloutMetrics | None = None
) -> dict:
    """RLOO on ``cfg.model`` against ``cfg.reward_model`` (or ``reward_fn``, as ``train_ppo``'s)."""
    return train_critic_free(cfg, "rloo", reward_fn, say, rollout_metrics)


def train_grpo(
    cfg: GRPOConfig, reward_fn: RewardFn | None = None, say=print, rollout_metrics: RolloutMetrics | None = None
) -> dict:
    """GRPO on ``cfg.model`` against ``cfg.reward_model`` (or ``reward_fn``, as ``train_ppo``'s)."""
    return train_critic_free(cfg, "grpo", reward_fn, say, rollout_metrics)


def train_critic_free(
    cfg: RLOOConfig, algo: str, reward_fn: RewardFn | None, say=print, rollout_metrics: RolloutMetrics | None = None
) -> dict:
    """The loop of ``train_ppo`` with ``advantages`` and ``update`` below in place of GAE and the
    critic; returns the final metrics."""
    check_config(cfg, reward_fn)
    if cfg.score_baseline != "none":
        raise UserError(f"score_baseline={cfg.score_baseline}: {algo} has its own group baseline; keep 'none'")
    if cfg.ptx_coef > 0:
        raise UserError(f"ptx_coef={cfg.ptx_coef}: PPO-ptx is PPO's (`rlhfkit ppo`)")
    acc = make_accelerator(cfg)
    rank, n_proc = world(acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    budget = TimeBudget(cfg, acc, say)  # cfg.max_seconds from here
    out, ckpt = prepare_out(cfg, acc)
    precision = resolve_precision(cfg.precision, acc.device)

    prompts = load_prompts(cfg, say)  # 0. data first
    m = load_models(cfg, acc.device, precision, reward_fn, say, acc)  # 1. policy, reference, RM; no critic
    queries = encode_queries(cfg, prompts, m.tok, say)
    plan = batch_plan(len(prompts), cfg)
    check_sharing(len(plan[0]), n_proc, lockstep(acc))  # every process gets prompts (FSDP2: as many)
    k = cfg.samples_per_prompt
    say(
        f"{algo.upper()}: {len(plan)} iterations x {min(cfg.batch_size, len(prompts))} prompts x {k} samples, "
        f"reward={'reward_fn' if reward_fn else cfg.reward_model}, {precision}"
    )
    opt, start = setup_optimization(cfg, m, len(plan), ckpt, say, acc)  # 3. AdamW over the policy, beta, resume
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    bar = progress(len(plan), start, acc.is_main_process, algo)
    last: dict = {}
    # one epoch over one minibatch: the policy that sampled is the one trained, so GRPO's old log-probs
    # are its training pass's, detached (as TRL's GRPOTrainer): no policy forward before training
    # (RLOO's reward needs them before: its KL term)
    on_policy = algo == "grpo" and cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
    t_run = time.perf_counter()
    for it in range(start, len(plan)):
        idx = sum(shard(plan[it], rank, n_proc, 1), [])  # 1. this process's prompts, each repeated k times
        batch_prompts = [prompts[i] for i in idx for _ in range(k)]
        batch_queries = [queries[i] for i in idx for _ in range(k)]
        times = {"time_push": push_weights(m)}
        with timed(times, "time_generate"):  # 2. k responses per prompt on the live weights
            completions = generate(m, cfg, [queries[i] for i in idx], it, idx)
        with timed(times, "time_score"):  # 3. cut after the first EOS, then score
            ro = score(m, cfg, batch_prompts, batch_queries, completions, reward_fn)
        with timed(times, "time_forward"):  # 4. log-probs of policy and reference, no grad
            ro.fw = forwards(m, cfg, ro.batch, with_policy=not on_policy)
        whole, share = global_rollout(acc, ro, [p for i in plan[it] for p in [prompts[i]] * k])  # all processes' rows
        beta = opt.kl_ctl.value
        seq_adv = sequence_advantages(cfg, algo, whole, beta)  # 5.-6. group baselines, over the global batch
        with timed(times, "time_train"):  # 7. clipped-ratio epochs over minibatches
            stats, seen = update(m, cfg, algo, ro, seq_adv, beta, opt, it, share)
        if on_policy:  # the training pass's log-probs and entropy are the rollout policy's
            ro.fw |= seen
            whole.fw |= {name: gather_rows(acc, v) for name, v in seen.items()}
        adv = advantages(whole, seq_adv, beta)  # per-token KL and rewards, for the metrics
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


def sequence_advantages(cfg: RLOOConfig, algo: str, ro: Rollout, beta: float) -> torch.Tensor:
    """One advantage per sequence (N,): RLOO's leave-one-out baseline of score − β·KL (optionally
    whitened), GRPO's group-normalised scores (its KL is in the loss instead)."""
    if algo == "grpo":
        return grpo_advantages(ro.scores, cfg.samples_per_prompt)
    rewards, _ = compute_rewards(ro.scores, ro.fw["logprobs"], ro.fw["ref_logprobs"], ro.batch.response_mask, beta)
    seq = rloo_advantages(rewards.sum(1), cfg.samples_per_prompt)  # (N,)
    if cfg.whiten_advantages:  # TRL 1.16's normalize_advantages, its eps too (benchmarks/critic_free_trl_check.py)
        seq = (seq - seq.mean()) / (seq.std() + 1e-4)
    return seq


def advantages(ro: Rollout, seq_adv: torch.Tensor, beta: float) -> Advantages:
    """PPO's per-token view of the iteration, for the metrics and the KL controller: ``rewards``/``kl``
    as PPO's (−β·KL on every token, plus the score on the last; their row sum is RLOO's sequence
    reward), the sequence advantages on every response token, ``returns`` zeros (no critic)."""
    mask = ro.batch.response_mask
    rewards, kl = compute_rewards(ro.scores, ro.fw["logprobs"], ro.fw["ref_logprobs"], mask, beta)  # (N, R)
    return Advantages(beta, rewards, kl, seq_adv.unsqueeze(1) * mask, torch.zeros_like(rewards))


def update(
    m: Models,
    cfg: RLOOConfig,
    algo: str,
    ro: Rollout,
    seq_adv: torch.Tensor,
    beta: float,
    opt: Optimization,
    it: int,
    share: Share,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``ppo_epochs`` passes over seeded minibatches of the global batch: per minibatch the loss of its
    micro-batches (weighted by their share of its sequences: both losses are means over sequences),
    one gradient clip, one AdamW step. Returns the per-step means, and — where ``ro.fw`` has no
    policy log-probs (on-policy GRPO: old = the training pass's, detached) — the training pass's
    log-probs and entropy of ``ro``'s rows, (n_local, R) each.

    ``ro`` is this process's rows, ``seq_adv`` the global batch's (N,) (``share``: where ``ro``'s rows
    are in it). Each process runs the micro-batches of its rows of each minibatch; the gradients are
    then summed over the processes, so N processes take the step one process would (PPO's ``update``)."""
    N, n_local = share.mask.shape[0], len(ro.texts)
    local_adv = seq_adv[share.offset : share.offset + n_local]  # (n_local,) this process's rows
    mb_size = math.ceil(N / cfg.num_minibatches)
    stats: dict[str, list[float]] = {}
    seen = {} if "logprobs" in ro.fw else {k: torch.zeros_like(ro.fw["ref_logprobs"]) for k in ("logprobs", "entropy")}
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(N, generator=_seeded(cfg.seed, it, epoch, 11), device="cpu").to(share.mask.device)
        for mb_start in range(0, N, mb_size):
            mb = perm[mb_start : mb_start + mb_size]
            mine = share.mine(mb, n_local)  # this process's rows of the minibatch, local indices
            chunks = micro_batches(share, ro.batch, mine, cfg.grad_accum)  # rows of similar length
            for j, (rows, real) in enumerate(chunks):
                b = ro.batch.rows(rows)
                cols = b.response.shape[1]
                with m.autocast():
                    _, logits = policy_forward(m.policy, b)  # (b, r, V)
                    if seen:  # on-policy: the entropy metric from the same pass over the vocabulary (as forwards')
                        logprobs, entropy = logprobs_and_entropy(logits, b.response, cfg.temperature)
                    else:
                        logprobs = logprobs_from_logits(logits, b.response, cfg.temperature)
                del logits
                if seen:  # on-policy: the sampling policy is this one, ratio 1, the gradient REINFORCE's
                    old = logprobs.detach()
                    if real:
                        seen["logprobs"][rows, :cols] = old * b.response_mask
                        seen["entropy"][rows, :cols] = entropy * b.response_mask
                else:
                    old = ro.fw["logprobs"][rows, :cols]
                row_adv = local_adv[rows]
                weight = len(rows) / len(mb) if real else 0.0  # the global minibatch's sequences (filler: none)
                if algo == "rloo":
                    rl = rloo_loss(logprobs, old, row_adv, b.response_mask, cfg.cliprange)
                    parts = {"policy_loss": rl.loss, "clipfrac": rl.clipfrac, "approx_kl": rl.approx_kl}
                    loss = rl.loss
                else:
                    ref = ro.fw["ref_logprobs"][rows, :cols]
                    gl = grpo_loss(logprobs, old, ref, row_adv, b.response_mask, cfg.cliprange, beta)
                    parts = {"policy_loss": gl.policy_loss, "kl_loss": gl.kl, "clipfrac": gl.clipfrac}
                    parts |= {"approx_kl": gl.approx_kl, "loss": gl.loss}
                    loss = gl.loss
                backward(share, weight * loss, last=j == len(chunks) - 1)  # DeepSpeed steps after the last
                for name, v in parts.items() if real else ():
                    stats.setdefault(name, []).append(weight * v.item())
            grad_norm = take_step(share, opt.optimizer, opt.trainable, cfg.max_grad_norm)
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            if grad_norm is not None and share.main:
                stats.setdefault("grad_norm", []).append(float(grad_norm))
    n_steps = cfg.ppo_epochs * math.ceil(N / mb_size)
    sums = sum_stats(share, stats, ["policy_loss", "kl_loss", "clipfrac", "approx_kl", "loss", "grad_norm"])
    return {n: s / (n_steps if n != "grad_norm" else c) for n, (s, c) in sums.items()}, seen
