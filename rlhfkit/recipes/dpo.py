"""DPO: the policy learns from rankings directly, without a reward model or sampling
(Rafailov et al. 2023; the math in ``algos/dpo.py``, docs/algorithms.md "DPO").

  1. data        each ranking -> its K tokenised responses and its untied (chosen, rejected) pairs
  2. policy      the SFT model (+ LoRA adapters); the reference is the same SFT model, frozen
  3. reference   log π_ref of every response computed ONCE, before training, and kept: the frozen
                 model is then not needed (under LoRA it is the base with the adapters disabled, so
                 there is never a second copy of the model)
  4. train step  chosen and rejected of a micro-batch in one padded forward -> per-pair loss ->
                 Σ w·loss / Σ w over the global batch -> backward -> clip -> step
  5. evaluate    the same loss and reward metrics on held-out pairs, before and after
  6. checkpoint  every ``save_every`` steps, atomically, exact resume; the final model saved merged
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from rlhfkit.accel import prepare_for_training
from rlhfkit.algos.dpo import dpo_loss, ranking_pairs, sequence_logprobs
from rlhfkit.config import DPOConfig
from rlhfkit.data.records import Ranking
from rlhfkit.data.tokenize import Encoded, collate, encode_prompt, encode_response, fit
from rlhfkit.errors import UserError
from rlhfkit.models.layout import keeps_logits_tail
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.lora import unwrap
from rlhfkit.recipes.common import (
    MetricsLog,
    TimeBudget,
    apply_lora,
    batch_plan,
    load_checkpoint,
    load_split,
    make_accelerator,
    make_optimizer,
    periodic_checkpoint,
    prepare_out,
    progress,
    save_model_dir,
    shard,
    world,
    write_checkpoint,
)
from rlhfkit.recipes.engines import check_batch, full_state_dict, lockstep, micro_batch, optimizer_step, prepare_models

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
METRICS += ("logps/chosen", "logps/rejected")
Pair = tuple[int, int, float]  # (chosen, rejected) indices into the list of sequences, and the pair's weight


def encode_pairs(tok, rankings: list[Ranking], cfg: DPOConfig, seqs: list[Encoded]) -> list[Pair]:
    """Append the K responses of every ranking to ``seqs``; return its pairs as indices into ``seqs``.

    Truncation as for SFT (``data/tokenize.fit``): no EOS is forced onto a cut response, the policy
    should not learn to stop there (the reward model's rule forces one, for its head to read)."""
    first = []
    for r in rankings:
        first.append(len(seqs))
        prompt = encode_prompt(tok, r.messages)
        for text in r.responses:
            p, resp, cut = fit(prompt, encode_response(tok, text), cfg.max_length)
            seqs.append(Encoded(p + resp, len(p), cut))
    return [
        (first[g] + i, first[g] + j, w) for g, i, j, w in ranking_pairs([r.ranks for r in rankings], cfg.pair_weighting)
    ]


def train_dpo(cfg: DPOConfig, say=print) -> dict:
    """Train ``cfg.model`` with DPO on the rankings or pairs in ``cfg.data``; returns the final metrics."""
    acc = make_accelerator(cfg)
    out, ckpt = prepare_out(cfg, acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    budget = TimeBudget(cfg, acc, say)  # cfg.max_seconds from here
    rank, n_proc = world(acc)
    if cfg.batch_size < n_proc:
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {n_proc} processes")
    # FSDP: every forward gathers the weights, so every process must run as many: each scores all
    # the reference and held-out sequences (not its share) and nothing is summed across processes
    together = lockstep(acc)

    # 1. data (a bad file is reported before the model loads): every response once, pairs index them
    train_recs, eval_recs = load_split(cfg, "ranking", say)
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    seqs: list[Encoded] = []
    train, held_out = encode_pairs(tok, train_recs, cfg, seqs), encode_pairs(tok, eval_recs, cfg, seqs)
    if cut := sum(e.truncated for e in seqs):
        say(f"truncated {cut} of {len(seqs)} responses to max_length={cfg.max_length} (prompt cut from the left first)")
    say(f"DPO: {len(train)} training and {len(held_out)} held-out pairs from {len(seqs)} responses")
    check_batch(acc, cfg, len(train))

    # 2. policy (+ LoRA), optimizer, accelerate
    model = loaded.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, cfg)
    prepare_for_training(model, cfg, acc.device, say, name="policy")
    plan = batch_plan(len(train), cfg)
    optimizer, scheduler = make_optimizer(model, cfg, len(plan))
    model, optimizer = prepare_models(acc, cfg, model, optimizer)

    keeps_tail = keeps_logits_tail(acc.unwrap_model(model))

    def logps_of(idx: list[int]) -> torch.Tensor:
        """Summed response log-probs (len(idx),) of sequences ``idx``, in one padded forward. The LM
        head runs from the shortest prompt's last token on (``logits_to_keep``, where the model takes
        it): the prompt columns before are never scored (~a quarter of the head's work on chat pairs)."""
        batch = {k: v.to(acc.device) for k, v in collate([seqs[i] for i in idx], tok.pad_token_id).items()}
        ids, mask, width = batch["input_ids"], batch["loss_mask"], batch["input_ids"].shape[1]
        keep = min(width, width - min(seqs[i].prompt_len for i in idx) + 1) if keeps_tail else width
        tail = {"logits_to_keep": keep} if keep < width else {}
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False, **tail).logits
        return sequence_logprobs(logits, ids[:, width - keep :], mask[:, width - keep :])  # (B, keep, V) -> (len(idx),)

    # 3. reference log-probs of every sequence, once (before a checkpoint's weights are loaded);
    #    each process does every n-th sequence (longest first: little padding), then they are summed
    model.eval()
    ref = torch.zeros(len(seqs), device=acc.device)
    step_by = 1 if together else n_proc
    mine = sorted(range(0 if together else rank, len(seqs), step_by), key=lambda i: -len(seqs[i].input_ids))
    base_only = acc.unwrap_model(model).disable_adapter() if cfg.lora else nullcontext()  # LoRA: the base model
    t_ref = time.perf_counter()
    with torch.no_grad(), base_only:
        for i in range(0, len(mine), 8):
            ref[mine[i : i + 8]] = logps_of(mine[i : i + 8])
    ref = ref if together else acc.reduce(ref, "sum")
    reference_seconds = time.perf_counter() - t_ref
    n_tokens = torch.tensor([len(e.input_ids) - e.prompt_len for e in seqs], device=acc.device)  # IPO's lengths
    model.train()

    def pair_sums(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ w·loss (differentiable) and Σ w·metric for every METRICS entry (detached) over ``pairs``."""
        c, r = [p[0] for p in pairs], [p[1] for p in pairs]
        w = torch.tensor([p[2] for p in pairs], device=acc.device)
        chosen, rejected = logps_of(c + r).chunk(2)  # chosen and rejected in one padded forward
        d = dpo_loss(
            chosen, rejected, ref[c], ref[r], cfg.beta, cfg.label_smoothing, cfg.loss_type, n_tokens[c], n_tokens[r]
        )
        values = (d.loss.detach(), *d[1:], chosen.detach(), rejected.detach())  # in the order of METRICS
        return (w * d.loss).sum(), torch.stack([(w * v).sum() for v in values])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not held_out:
            return {}
        model.eval()
        sums = torch.zeros(len(METRICS), device=acc.device)
        for i in range(0 if together else rank * 4, len(held_out), 4 * (1 if together else n_proc)):
            sums += pair_sums(held_out[i : i + 4])[1]
        model.train()
        values = (sums if together else acc.reduce(sums, "sum")) / sum(p[2] for p in held_out)
        return {f"eval_{k}": v for k, v in zip(METRICS, values.tolist())}

    # resume: weights, optimizer, schedule, RNG
    start = 0
    if ckpt is not None:
        start, _ = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler, acc, model)
        say(f"resumed from {ckpt} at step {start}")
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    before = evaluate() if start == 0 else {}
    if before:
        log.log(0, **before)
        say(f"held-out before training: loss {before['eval_loss']:.4f}, accuracy {before['eval_rewards/accuracy']:.3f}")

    t_train = time.perf_counter()
    bar = progress(len(plan), start, acc.is_main_process, "dpo")
    last: dict = {}
    for step in range(start, len(plan)):
        pairs = [train[i] for i in plan[step]]
        total_weight = sum(p[2] for p in pairs)  # of the global batch: every process knows it
        sums = torch.zeros(len(METRICS), device=acc.device)
        # 4. train step
        micro = shard(list(range(len(pairs))), rank, n_proc, cfg.grad_accum)
        for j, mb in enumerate(micro):
            with micro_batch(acc, model, last=j == len(micro) - 1):
                loss_sum, metric_sums = pair_sums([pairs[i] for i in mb])
                acc.backward(loss_sum / total_weight * n_proc)  # DDP/FSDP average over processes, hence × n_proc
            sums += metric_sums
        grad_norm = optimizer_step(acc, model, optimizer, cfg.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        last = dict(zip(METRICS, (acc.reduce(sums, "sum") / total_weight).tolist()))
        last["lr"] = scheduler.get_last_lr()[0]
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        # 5. evaluate
        if cfg.eval_every and done % cfg.eval_every == 0 and done != len(plan):
            last |= evaluate()
        if done % cfg.log_every == 0 or "eval_loss" in last:
            log.log(done, **last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
        # 6. checkpoint
        periodic_checkpoint(acc, cfg, out, done, len(plan), acc.unwrap_model(model), optimizer, scheduler, model)
        if budget.spent(done, len(plan)):
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train

    final = evaluate()
    log.log(budget.steps(len(plan)), **final)
    log.close()
    result = {"step": len(plan), **last, **final, "train_seconds": train_seconds, **budget.result()}
    result["reference_seconds"] = reference_seconds  # the one reference pass, before training
    result |= {f"{k}_before": v for k, v in before.items()}
    if cfg.save_every:
        write_checkpoint(acc, out, budget.steps(len(plan)), acc.unwrap_model(model), optimizer, scheduler, model)
    weights = full_state_dict(acc, model)  # FSDP: the whole weights, gathered; else None (the model's own)
    if acc.is_main_process:
        save_model_dir(unwrap(acc.unwrap_model(model), merge=True), tok, out / "model", weights)
        got = f"; held-out accuracy {final['eval_rewards/accuracy']:.3f}" if final else ""
        say(f"saved {out / 'model'}{got}")
    acc.wait_for_everyone()
    return result
