"""A2C: synchronous advantage actor-critic on PPO's phases (``rlhfkit/recipes/ppo.py``).

[A3C] Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning" — its synchronous
variant, A2C: one learner takes one gradient step on each batch of rollouts, of the policy
gradient −Â_t log π(y_t) (+ an optional entropy bonus) and the value loss ½ (V − R)².

An iteration is PPO's, phase for phase and with the same functions — 1. prompts, 2. generate,
3. score, 4. no-grad forwards (policy, reference, critic), 5. rewards with the per-token KL
penalty, 6. GAE advantages (whitened) and returns — then 7. ONE gradient step on the whole
rollout batch (``grad_accum`` micro-batches, one gradient clip, one AdamW step): PPO's ``update``
with one epoch, one minibatch and A2C's loss (``algos/a2c.py``) in place of the clipped surrogate.
The step is taken at the weights that sampled the rollout, so there is no ratio to clip: PPO with
one epoch and one minibatch takes the same step ([A2C=PPO] Huang et al. 2022, "A2C is a Special
Case of PPO"; tests/test_a2c.py checks the gradients match). Several processes: PPO's
(``ppo_processes.py``). Writes what PPO writes: metrics.jsonl, checkpoints, ``out/model``, ``out/critic``.
"""

from __future__ import annotations

import time

from rlhfkit.algos.a2c import a2c_policy_loss
from rlhfkit.algos.logprobs import entropy_from_logits
from rlhfkit.config import A2CConfig
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
    RewardFn,
    RolloutMetrics,
    check_config,
    encode_queries,
    forwards,
    generate,
    load_models,
    load_prompts,
    rewards_and_advantages,
    score,
    setup_optimization,
    timed,
    update,
)
from rlhfkit.recipes.ppo_processes import check_sharing, global_rollout, push_weights
from rlhfkit.recipes.ppo_saving import log_and_checkpoint, save_final


def train_a2c(
    cfg: A2CConfig, reward_fn: RewardFn | None = None, say=print, rollout_metrics: RolloutMetrics | None = None
) -> dict:
    """A2C on ``cfg.model`` against ``cfg.reward_model`` (or ``reward_fn``, as ``train_ppo``'s); returns
    the final metrics."""
    check_config(cfg, reward_fn)
    if cfg.ptx_coef > 0:
        raise UserError(f"ptx_coef={cfg.ptx_coef}: PPO-ptx is PPO's (`rlhfkit ppo`)")
    acc = make_accelerator(cfg)
    rank, n_proc = world(acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    budget = TimeBudget(cfg, acc, say)  # cfg.max_seconds from here
    out, ckpt = prepare_out(cfg, acc)
    precision = resolve_precision(cfg.precision, acc.device)

    prompts = load_prompts(cfg, say)  # 0. data first
    m = load_models(cfg, acc.device, precision, reward_fn, say, acc)  # 1. policy, reference, critic, RM
    queries = encode_queries(cfg, prompts, m.tok, say)
    plan = batch_plan(len(prompts), cfg)
    check_sharing(len(plan[0]), n_proc, lockstep(acc))  # every process gets prompts (FSDP2: as many)
    k = cfg.samples_per_prompt
    say(
        f"A2C: {len(plan)} iterations x {min(cfg.batch_size, len(prompts))} prompts x {k} samples, "
        f"critic={cfg.critic}, reward={'reward_fn' if reward_fn else cfg.reward_model}, {precision}"
    )
    opt, start = setup_optimization(cfg, m, len(plan), ckpt, say, acc)  # 3. AdamW over policy and critic, beta, resume
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    bar = progress(len(plan), start, acc.is_main_process, "a2c")
    last: dict = {}
    t_run = time.perf_counter()
    for it in range(start, len(plan)):
        idx = sum(shard(plan[it], rank, n_proc, 1), [])  # 1. this process's prompts, each repeated k times
        batch_prompts = [prompts[i] for i in idx for _ in range(k)]
        batch_queries = [queries[i] for i in idx for _ in range(k)]
        times = {"time_push": push_weights(m)}
        with timed(times, "time_generate"):  # 2. generate on the live weights
            completions = generate(m, cfg, [queries[i] for i in idx], it, idx)
        with timed(times, "time_score"):  # 3. cut after the first EOS, then score
            ro = score(m, cfg, batch_prompts, batch_queries, completions, reward_fn)
        with timed(times, "time_forward"):  # 4. log-probs (policy, reference) and values, no grad
            ro.fw = forwards(m, cfg, ro.batch)
        whole, share = global_rollout(acc, ro, [p for i in plan[it] for p in [prompts[i]] * k])  # all processes' rows
        # 5.-6. per-token rewards with the KL penalty, GAE advantages and returns, over the global batch
        adv = rewards_and_advantages(cfg, whole, opt.kl_ctl.value)
        with timed(times, "time_train"):  # 7. one gradient step on the whole rollout batch
            stats = update(m, cfg, ro, adv, opt, it, None, share, policy_loss=a2c_loss)
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


def a2c_loss(cfg: A2CConfig, logits, logprobs, old_logprobs, advantages, mask):
    """A2C's policy loss of a micro-batch for PPO's ``update`` (in place of ``clipped_policy_loss``):
    −Â log π, minus ``entropy_coef`` × the entropy of the policy's logits / temperature; the rollout's
    log-probs are not needed (the step is at ratio 1). Returns the loss and the statistics to log."""
    entropy = entropy_from_logits(logits, cfg.temperature) if cfg.entropy_coef > 0 else None  # (b, r)
    out = a2c_policy_loss(logprobs, advantages, mask, entropy, cfg.entropy_coef)
    return out.loss, {"policy_loss": out.loss} | ({"pg_loss": out.pg_loss} if entropy is not None else {})
