"""Step 3 of the recipe: PPO against the reward model, with a per-token KL penalty to the SFT
model (InstructGPT §3.5 "Reinforcement learning"; the details follow Huang et al. 2024, "The N
Implementation Details of RLHF with PPO", and its code vwxyzjn/summarize_from_feedback_details).

The models (one process; all forwards in the training precision, bf16 autocast by default):
  policy     the SFT model, trained (or LoRA adapters on it)
  reference  the frozen SFT model — with LoRA the same weights with the adapters disabled
  critic     a copy of the reward model whose scalar head is applied at every token
             (critic='rm'), or a value head on the policy trunk (critic='policy_head')
  reward     the reward model's normalised score at the last response token, or a Python
             ``reward_fn(prompts, responses, finished) -> list[float]``

Each iteration, numbered as in the algorithm:
  1. prompts       a seeded batch of prompts (the batch plan of the run, so resume is exact)
  2. generate      responses from the live policy weights with the rollout engine (never HF generate)
  3. score         cut after the first EOS; RM score or reward_fn; score clipping; missing-EOS penalty;
                   optionally minus the leave-one-out mean of the prompt's other samples (score_baseline)
  4. forwards      log-probs of policy and reference and the critic's values, without grad, in
                   the training precision (the engine's log-probs are NOT reused for the ratio)
  5. rewards       r_t = −β (log π − log π_ref), plus the score on the last response token
  6. advantages    GAE(γ, λ), then whitened over the batch
  7. PPO           ppo_epochs × num_minibatches steps of policy loss + vf_coef · value loss
                   (+ ptx_coef · pretraining NLL), one global gradient-norm clip, AdamW
  8. log           KL controller update, metrics.jsonl line, checkpoint

The models and their no-grad forwards (batch layout, critic, log-probs, scores) live in
``ppo_models.py``; the math (GAE, KL, clipped losses) in ``rlhfkit/algos/ppo.py``. The log-probs
divide the logits by the sampling temperature [N-details, "scale the logits by the sampling
temperature"].
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import nn

from rlhfkit.algos.ppo import (AdaptiveKLController, FixedKLController, apply_missing_eos_penalty, clip_scores,
                               compute_gae, group_baseline, compute_rewards, explained_variance, kl_k3,
                               logprobs_from_logits, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss,
                               whiten_rewards)
from rlhfkit.config import PPOConfig
from rlhfkit.data.records import Prompt
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import UserError
from rlhfkit.models.heads import load_reward_model
from rlhfkit.models.loading import load_causal_lm, resolve_precision
from rlhfkit.recipes.common import (clip_and_step, MetricsLog, apply_lora, batch_plan, load_checkpoint, make_accelerator,
                                    make_optimizer, merged, prepare_out, progress, save_checkpoint, save_model_dir)
from rlhfkit.recipes.blocks import compile_blocks, fresh_compile_cache, use_training_attention
from rlhfkit.recipes.memory import release_memory, rss_mb
from rlhfkit.recipes.ppo_models import (Critic, _Checkpoint, _unwrap, bf16_matmul_weights, cut_responses, length_chunks,
                                        make_batch, policy_hidden, response_logits, rm_scores, rollout_forwards)
from rlhfkit.rollout import Engine, SamplingParams

RSS_SLACK = 1.25  # hand freed memory back to the OS when the resident size grew by this factor
RewardFn = Callable[[list[Prompt], list[str], list[bool]], Sequence[float]]


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

        got = load_records(cfg.data, "prompt", fields=cfg.fields or None, split=cfg.split, skip_invalid=cfg.skip_invalid)
        say(got.summary())
        prompts = got.records
    return prompts[: cfg.limit] if cfg.limit else prompts


def load_ptx(cfg: PPOConfig) -> list[str] | None:
    """PPO-ptx corpus documents (None when PPO-ptx is off)."""
    from rlhfkit.data.loaders import load_records

    if not (cfg.ptx_data and cfg.ptx_coef > 0):
        return None
    return load_records(cfg.ptx_data, "text", fields=cfg.fields or None).records


def ptx_chunks(cfg: PPOConfig, docs: list[str], tok) -> list[list[int]]:
    """PPO-ptx corpus chunks (token ids), cut like ``rlhfkit pretrain`` does."""
    from rlhfkit.recipes.pretrain import chunk_corpus

    chunks = [e.input_ids for e in chunk_corpus(tok, docs, cfg.ptx_length)]
    if not chunks:
        raise UserError(f"ptx_data={cfg.ptx_data}: no chunk of >= 2 tokens")
    return chunks


def ptx_loss(policy, chunks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over the tokens of ``chunks`` (InstructGPT's PPO-ptx term)."""
    T = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(chunks), T, dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    hidden = _unwrap(policy).model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, d)
    logits = _unwrap(policy).lm_head(hidden).float()  # (B, T-1, V)
    target_mask = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])
    return nll


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


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None, say=print) -> dict:
    """PPO on ``cfg.model`` against ``cfg.reward_model`` (or ``reward_fn``); returns final metrics.

    ``reward_fn(prompts, responses, finished) -> scores``: one float per response, given the
    Prompt records, the decoded responses (cut at EOS) and whether each one produced EOS.
    Writes ``out/metrics.jsonl`` (one line per iteration), checkpoints, ``out/model`` (the
    policy, a plain Hugging Face directory, LoRA merged) and ``out/critic``.
    """
    if cfg.critic not in ("rm", "policy_head"):
        raise UserError(f"critic={cfg.critic!r}: expected 'rm' or 'policy_head'")
    if reward_fn is None and not cfg.reward_model:
        raise UserError("reward_model=…: PPO needs a reward model directory (or a reward_fn from Python)")
    if cfg.score_baseline not in ("none", "group"):
        raise UserError(f"score_baseline={cfg.score_baseline!r}: expected 'none' or 'group'")
    if cfg.score_baseline == "group" and cfg.samples_per_prompt < 2:
        raise UserError("score_baseline=group compares the samples of one prompt: set samples_per_prompt >= 2")
    if cfg.num_minibatches < 1 or cfg.ppo_epochs < 1:
        raise UserError("num_minibatches and ppo_epochs must be >= 1")
    acc = make_accelerator(cfg)
    if acc.num_processes > 1:
        raise UserError("rlhfkit ppo runs in one process (multi-process PPO is not implemented)")
    out, ckpt = prepare_out(cfg, acc)
    device = acc.device
    precision = resolve_precision(cfg.precision, device)
    bf16 = precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # 0. data first: a bad file is reported before minutes of model loading
    prompts = load_prompts(cfg, say)
    ptx_docs = load_ptx(cfg)

    # 1. models: policy (+ LoRA), reference, critic, reward model
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    pad_id = tok.pad_token_id
    policy = loaded.model.to(device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    use_training_attention(policy, device)
    policy = apply_lora(policy, cfg)
    fresh_compile_cache()  # the variants of an earlier stage in this process would crowd out PPO's
    compiled = compile_blocks(policy, cfg, device, say)
    if compiled:
        say("compiling the policy's transformer blocks (torch.compile; once per machine, cached)")
    lora_ref = cfg.lora
    ref = None
    if not lora_ref:  # the frozen SFT model; with LoRA it is the policy with adapters disabled
        ref = load_causal_lm(cfg.model).model.to(device).requires_grad_(False).eval()
        use_training_attention(ref, device)
        if bf16:
            bf16_matmul_weights(ref)
        if compiled:
            # the policy's kernels: compiled and eager bf16 forwards of the same weights differ by
            # ~0.06 nats per token (Inductor fuses elementwise work without bf16 rounding in
            # between), a spurious KL of ~0.7 nats per 100-token response at step 0; with the same
            # compiled blocks the two log-probs agree exactly
            compile_blocks(ref, cfg, device, say)
    if cfg.critic == "policy_head":
        d = _unwrap(policy).config.hidden_size
        head = nn.Linear(d, 1, bias=False)
        # zero: the first advantages are plain Monte-Carlo returns. A random head gives values of
        # a few units, and GAE charges that bias to the last token — the EOS — so the policy
        # learns not to stop (seen on SmolLM2: no-EOS share 0.38 -> 0.94 in 6 iterations).
        nn.init.zeros_(head.weight)
        critic = Critic("policy_head", head=head.to(device))
    else:
        seq_model = load_reward_model(cfg.critic_model or cfg.reward_model or cfg.model)[0].seq_model
        if cfg.gradient_checkpointing:
            seq_model.gradient_checkpointing_enable()
        use_training_attention(seq_model, device)
        critic = Critic("rm", seq_model=apply_lora(seq_model, cfg, task_type="SEQ_CLS").to(device))
        compile_blocks(critic.seq_model, cfg, device, say)
    rm = None
    if reward_fn is None:
        rm, rm_tok = load_reward_model(cfg.reward_model, dtype=torch.bfloat16 if bf16 else torch.float32)
        if rm_tok.get_vocab() != tok.get_vocab():
            raise UserError(f"reward_model={cfg.reward_model}: its tokenizer differs from the policy's ({cfg.model})")
        rm = rm.to(device).requires_grad_(False).eval()
        if compiled:  # inference only: Inductor fuses its elementwise work as for the policy
            use_training_attention(rm.seq_model, device)
            compile_blocks(rm.seq_model, cfg, device, say)
    policy.train()
    critic.train()
    engine = Engine(policy, tok, precision=precision)
    if not engine.eos_ids:
        raise UserError(f"{cfg.model}: the tokenizer has no EOS token; responses could never end")

    # 2. prompts, batch plan (one batch of prompts per iteration), PPO-ptx corpus
    queries = [encode_prompt(tok, p.messages) for p in prompts]
    cut = sum(len(q) > cfg.max_prompt_length for q in queries)
    if cut:
        say(f"{cut} prompts longer than max_prompt_length={cfg.max_prompt_length} keep their last tokens")
    queries = [q[-cfg.max_prompt_length :] for q in queries]
    gold = all(p.meta.get("instructions") for p in prompts)
    plan = batch_plan(len(prompts), cfg)
    ptx = ptx_chunks(cfg, ptx_docs, tok) if ptx_docs is not None else None
    say(f"PPO: {len(plan)} iterations x {min(cfg.batch_size, len(prompts))} prompts x {cfg.samples_per_prompt} "
        f"samples, critic={cfg.critic}, reward={'reward_fn' if reward_fn else cfg.reward_model}, {precision}"
        + (f", ptx {len(ptx)} chunks" if ptx else ""))

    # 3. optimizer over policy and critic (one AdamW, one gradient clip), KL controller, resume
    both = nn.ModuleDict({"policy": policy, "critic": critic})
    n_updates = len(plan) * cfg.ppo_epochs * cfg.num_minibatches
    head_lr = {critic.head.weight: cfg.value_head_lr} if critic.kind == "policy_head" and cfg.value_head_lr > 0 else None
    optimizer, scheduler = make_optimizer(both, cfg, n_updates, lr_of=head_lr)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    start = 0
    if ckpt is not None:
        start, extra = load_checkpoint(ckpt, policy, optimizer, scheduler)
        critic.load(ckpt / "model" / "critic")
        kl_ctl.load_state_dict(extra["kl_ctl"])
        say(f"resumed from {ckpt} at iteration {start}")
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    trainable = [p for p in both.parameters() if p.requires_grad]

    bar = progress(len(plan), start, True, "ppo")
    last: dict = {}
    rss_base = 0.0
    t_run = time.perf_counter()
    for it in range(start, len(plan)):
        # 1. prompts of this iteration (each repeated samples_per_prompt times, prompt-major)
        idx = plan[it]
        batch_prompts = [prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]
        batch_queries = [queries[i] for i in idx for _ in range(cfg.samples_per_prompt)]

        # 2. generate with the engine on the live weights (seeded per iteration: resume-exact)
        t0 = time.perf_counter()
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                ignore_eos=cfg.ignore_eos, seed=_seed(cfg.seed, it, 7))
        with torch.no_grad():
            completions = engine.generate([queries[i] for i in idx], params, n=cfg.samples_per_prompt)
        t_generate = time.perf_counter() - t0

        # 3. cut after the first EOS, then score
        t0 = time.perf_counter()
        response, response_mask, ended = cut_responses(completions, engine.eos_ids, pad_id)
        batch = make_batch(batch_queries, response, response_mask, pad_id)
        texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(batch.response, batch.response_mask)]
        finished = ended.tolist()
        if reward_fn is not None:
            raw = torch.tensor([float(s) for s in reward_fn(batch_prompts, texts, finished)], dtype=torch.float32)
            if raw.shape != (len(texts),):
                raise UserError(f"reward_fn returned {raw.shape[0] if raw.dim() else 'a scalar'} scores for {len(texts)} responses")
        else:
            raw = rm_scores(rm, batch, cfg.forward_batch_size, autocast)
        scores = clip_scores(raw, cfg.score_clip) if cfg.score_clip > 0 else raw
        if cfg.missing_eos_penalty is not None:
            scores = apply_missing_eos_penalty(scores, ended, cfg.missing_eos_penalty)
        penalised = scores  # what is logged as "score": the baseline only centres it per prompt
        if cfg.score_baseline == "group":
            scores = group_baseline(scores, cfg.samples_per_prompt)
        t_score = time.perf_counter() - t0
        gold_mean = None
        if gold:
            from rlhfkit.feedback.rubric import score as gold_score

            gold_mean = sum(gold_score(p, t, f).total for p, t, f in zip(batch_prompts, texts, finished)) / len(texts)

        # 4. log-probs (policy, reference) and values, no grad, logits / temperature
        t0 = time.perf_counter()
        fw = rollout_forwards(policy, ref, critic, batch, cfg.temperature, cfg.forward_batch_size, autocast, lora_ref)
        mask = batch.response_mask
        t_forward = time.perf_counter() - t0

        # 5. per-token rewards: −β·KL on every token, the score on the last one
        beta = kl_ctl.value
        rewards, kl = compute_rewards(scores, fw["logprobs"], fw["ref_logprobs"], mask, beta)
        if cfg.whiten_rewards:
            rewards = whiten_rewards(rewards, mask)

        # 6. advantages (GAE) and returns; whiten the advantages over the batch
        advantages, returns = compute_gae(rewards, fw["values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 7. PPO epochs over minibatches
        t0 = time.perf_counter()
        N = len(texts)
        mb_size = math.ceil(N / cfg.num_minibatches)
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(N, generator=_seeded(cfg.seed, it, epoch, 11))
            for k, mb_start in enumerate(range(0, N, mb_size)):
                mb = perm[mb_start : mb_start + mb_size]
                n_tokens = mask[mb].sum()
                # micro-batches of rows of similar length (length_chunks): less padding, same loss
                micro = length_chunks(batch, mb, math.ceil(len(mb) / max(1, min(cfg.grad_accum, len(mb)))))
                for m in micro:
                    b = batch.rows(m)
                    cols = b.response.shape[1]
                    m_mask = b.response_mask
                    weight = m_mask.sum() / n_tokens  # token-weighted: micro-batching leaves the loss unchanged
                    old_lp, adv = fw["logprobs"][m, :cols], advantages[m, :cols]
                    old_v, ret = fw["values"][m, :cols], returns[m, :cols]
                    if critic.kind == "rm":
                        # separate models, separate graphs: the critic's forward + backward first,
                        # then the policy's, so only one graph (and one bf16 weight cast) is alive
                        with autocast():
                            values = critic.values(b)
                        vl = ppo_value_loss(values, old_v, ret, m_mask, cfg.cliprange_value)
                        (weight * cfg.vf_coef * vl.loss).backward()
                        with autocast():
                            h = policy_hidden(policy, b)  # (b, r, d)
                            new_logprobs = logprobs_from_logits(response_logits(policy, h), b.response, cfg.temperature)
                        pl = ppo_policy_loss(new_logprobs, old_lp, adv, m_mask, cfg.cliprange)
                        (weight * pl.loss).backward()
                    else:  # one trunk forward gives both the log-probs and the values
                        with autocast():
                            h = policy_hidden(policy, b)
                            new_logprobs = logprobs_from_logits(response_logits(policy, h), b.response, cfg.temperature)
                            values = critic.values(b, hidden=h)
                        pl = ppo_policy_loss(new_logprobs, old_lp, adv, m_mask, cfg.cliprange)
                        vl = ppo_value_loss(values, old_v, ret, m_mask, cfg.cliprange_value)
                        (weight * (pl.loss + cfg.vf_coef * vl.loss)).backward()
                    w = weight.item()
                    for name, v in (("policy_loss", pl.loss), ("clipfrac", pl.clipfrac), ("approx_kl", pl.approx_kl),
                                    ("value_loss", vl.loss), ("value_clipfrac", vl.clipfrac), ("ratio_mean", pl.ratio_mean)):
                        stats.setdefault(name, []).append(w * v.item())
                if ptx is not None:
                    order = torch.randperm(len(ptx), generator=_seeded(cfg.seed, it, epoch, k, 13))[: cfg.ptx_batch_size]
                    with autocast():
                        nll = ptx_loss(policy, [ptx[i] for i in order.tolist()], pad_id)
                    (cfg.ptx_coef * nll).backward()
                    stats.setdefault("ptx_loss", []).append(nll.item())
                grad_norm = clip_and_step(optimizer, trainable, cfg.max_grad_norm)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if grad_norm is not None:
                    stats.setdefault("grad_norm", []).append(float(grad_norm))
        t_train = time.perf_counter() - t0
        n_steps = cfg.ppo_epochs * math.ceil(N / mb_size)

        # 8. KL controller, metrics, checkpoint
        kl_per_seq = kl.sum(1)  # (N,)
        kl_mean = float(kl_per_seq.mean())
        kl_ctl.update(kl_mean, N)
        done = it + 1
        last = {
            "score": float(penalised.mean()), "score_raw": float(raw.mean()),
            "kl": kl_mean, "kl_k3": float((kl_k3(fw["logprobs"], fw["ref_logprobs"]) * mask).sum(1).mean()),
            "entropy": float(masked_mean(fw["entropy"], mask)),
            "non_score_reward": float((-beta * kl).sum(1).mean()), "reward": float(rewards.sum(1).mean()),
            "beta": beta,
            "explained_variance": float(explained_variance(fw["values"], returns, mask)),
            "value_mean": float(masked_mean(fw["values"], mask)), "return_mean": float(masked_mean(returns, mask)),
            "response_length": float(mask.sum(1).float().mean()), "no_eos_fraction": float((~ended).float().mean()),
            "lr": scheduler.get_last_lr()[0],
            "time_generate": t_generate, "time_score": t_score, "time_forward": t_forward, "time_train": t_train,
            "time_iteration": t_generate + t_score + t_forward + t_train,
        }
        # Freed memory is kept for the next iteration's tensors (reuse_freed_memory): handing it back
        # every iteration made each one page-fault its GBs afresh (~1.4x slower, same peak RSS).
        # It is handed back only if the resident size grew by a quarter over the first iteration's,
        # so fragmentation cannot make it creep.
        last["rss_mb"], last["peak_rss_mb"] = rss_mb()
        rss_base = rss_base or last["rss_mb"]
        if last["rss_mb"] > RSS_SLACK * rss_base:
            release_memory()
            last["rss_mb"] = rss_mb()[0]
        # per-step means (token-weighted over micro-batches, then averaged over the optimizer steps)
        last |= {name: sum(v) / n_steps if name not in ("ptx_loss", "grad_norm") else sum(v) / len(v)
                 for name, v in stats.items()}
        if gold_mean is not None:
            last["gold_score"] = gold_mean
        if done % cfg.log_every == 0 or done == len(plan):
            log.log(done, **last)
        bar.update(1)
        bar.set_postfix(score=f"{last['score']:.3f}", kl=f"{kl_mean:.3f}")
        if cfg.save_every and done % cfg.save_every == 0 and done != len(plan):
            save_checkpoint(out, done, _Checkpoint(policy, critic), optimizer, scheduler,
                            extra={"kl_ctl": kl_ctl.state_dict()})
    bar.close()
    log.close()
    seconds = time.perf_counter() - t_run

    # save: checkpoint (resumable), then the policy merged as a plain HF directory, and the critic
    result = {"step": len(plan), **last, "train_seconds": seconds}
    if cfg.save_every:
        save_checkpoint(out, len(plan), _Checkpoint(policy, critic), optimizer, scheduler,
                        extra={"kl_ctl": kl_ctl.state_dict()})
    critic.save(out / "critic", merge=True)
    if critic.kind == "rm":
        tok.save_pretrained(out / "critic")
    save_model_dir(merged(policy), tok, out / "model")  # last: out/model marks a finished run
    say(f"saved {out / 'model'} and {out / 'critic'}; last score {last.get('score', float('nan')):.4f}, "
        f"KL {last.get('kl', float('nan')):.4f}")
    return result
