"""Step 1 of the recipe: supervised fine-tuning on demonstrations (InstructGPT §3.5 "SFT").

The loss is the next-token NLL on *response tokens only* (the prompt is context), averaged
over all response tokens of the global batch. ``run_lm_training`` is also the loop of
``rlhfkit pretrain`` (every token a target) — read it top to bottom:

  1. batch plan    the run's global batches, fixed by the seed (so resume is exact)
  2. prepare       optimizer + schedule, accelerate (DDP or FSDP2 across processes when launched so)
  3. resume        weights, optimizer, schedule, RNG from the latest checkpoint
  4. train step    micro-batches -> masked NLL / global token count -> backward -> clip -> step
  5. evaluate      held-out loss every ``eval_every`` steps and at the end
  6. checkpoint    every ``save_every`` steps, atomically; the final model saved merged
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rlhfkit.accel import prepare_for_training
from rlhfkit.accel.attention import additive_attention_mask
from rlhfkit.algos.losses import masked_nll_sum
from rlhfkit.config import SFTConfig, TrainConfig
from rlhfkit.data.tokenize import Encoded, collate, collate_packed, encode_demonstration, length_groups
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.lora import unwrap
from rlhfkit.recipes.common import (
    MetricsLog,
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


def train_sft(cfg: SFTConfig, say=print) -> dict:
    """Fine-tune ``cfg.model`` on the demonstrations in ``cfg.data``; returns final metrics."""
    acc = make_accelerator(cfg)
    out, ckpt = prepare_out(cfg, acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)

    train_recs, eval_recs = load_split(cfg, "demonstration", say)  # a bad file is reported before the model loads
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    train = [encode_demonstration(tok, d, cfg.max_length) for d in train_recs]
    held_out = [encode_demonstration(tok, d, cfg.max_length) for d in eval_recs]
    cut = sum(e.truncated for e in train + held_out)
    if cut:
        say(
            f"truncated {cut} of {len(train) + len(held_out)} examples to max_length={cfg.max_length} "
            "(prompt cut from the left first)"
        )
    say(f"SFT: {len(train)} training and {len(held_out)} held-out demonstrations")
    return run_lm_training(cfg, acc, loaded.model, tok, train, held_out, out, ckpt, say, desc="sft")


def targets(e: Encoded) -> int:
    """Tokens of ``e`` that are predicted: the response (the first token never is)."""
    return len(e.input_ids) - max(e.prompt_len, 1)


def run_lm_training(
    cfg: TrainConfig,
    acc,
    model,
    tok,
    train: list[Encoded],
    held_out: list[Encoded],
    out: Path,
    ckpt: Path | None,
    say=print,
    desc: str = "train",
) -> dict:
    rank, n_proc = world(acc)
    packing = getattr(cfg, "packing", False)
    check_batch(acc, cfg, len(train))
    # FSDP: every forward gathers the weights, so every process runs one forward per micro-batch
    # (not one per length group, whose number differs between processes) and evaluates all of
    # the held-out set (not its share); the same numbers either way
    together = lockstep(acc)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, cfg)
    prepare_for_training(model, cfg, acc.device, say, name=desc)

    def batch_inputs(examples: list[Encoded]) -> dict[str, torch.Tensor]:
        if packing:
            return collate_packed(examples, tok.pad_token_id, cfg.max_length)
        return collate(examples, tok.pad_token_id, response_only=True)

    def forward_nll(examples: list[Encoded]) -> torch.Tensor:
        """Summed NLL of the target tokens of ``examples`` (similar lengths share a forward)."""
        parts = (
            [examples]
            if packing or together
            else [[examples[i] for i in g] for g in length_groups([len(e.input_ids) for e in examples])]
        )
        total = torch.zeros((), device=acc.device)
        for part in parts:
            batch = batch_inputs(part)
            kw = {k: v.to(acc.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            kw["attention_mask"] = additive_attention_mask(model, kw["attention_mask"])  # packed rows: 4-D
            logits = model(**kw, use_cache=False).logits  # (B, T, V)
            nll, _ = masked_nll_sum(logits, kw["input_ids"], batch["loss_mask"].to(acc.device))
            total = total + nll
        return total

    @torch.no_grad()
    def evaluate() -> float | None:
        if not held_out:
            return None
        model.eval()
        mine = held_out if together else held_out[rank::n_proc]
        total = torch.zeros((), device=acc.device)
        for i in range(0, len(mine), max(1, cfg.batch_size // n_proc)):
            total += forward_nll(mine[i : i + max(1, cfg.batch_size // n_proc)])
        model.train()
        total = total if together else acc.reduce(total, "sum")
        return (total / sum(targets(e) for e in held_out)).item()

    # 1. batch plan: global batches of example indices, fixed by the seed
    plan = batch_plan(len(train), cfg)
    # 2. optimizer, schedule, accelerate
    optimizer, scheduler = make_optimizer(model, cfg, len(plan))
    model, optimizer = prepare_models(acc, cfg, model, optimizer)
    model.train()
    # 3. resume
    start = 0
    if ckpt is not None:
        start, _ = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler, acc, model)
        say(f"resumed from {ckpt} at step {start}")
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    first_eval = evaluate() if start == 0 else None
    if first_eval is not None:
        log.log(0, eval_loss=first_eval)
        say(f"held-out loss before training: {first_eval:.4f}")

    t_train = time.perf_counter()
    bar = progress(len(plan), start, acc.is_main_process, desc)
    last: dict = {}
    for step in range(start, len(plan)):
        batch = plan[step]
        # The normaliser is the number of target tokens in the *global* batch: every process
        # knows the whole batch, so each divides its own sum by the same count and no
        # all-reduce is needed. DDP and FSDP average gradients over processes, hence the × n_proc.
        n_targets = sum(targets(train[i]) for i in batch)
        micro = shard(batch, rank, n_proc, cfg.grad_accum)
        loss_sum = torch.zeros((), device=acc.device)
        # 4. train step
        for j, mb in enumerate(micro):
            with micro_batch(acc, model, last=j == len(micro) - 1):
                nll = forward_nll([train[i] for i in mb])
                acc.backward(nll / n_targets * n_proc)
            loss_sum += nll.detach()
        grad_norm = optimizer_step(acc, model, optimizer, cfg.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = (acc.reduce(loss_sum, "sum") / n_targets).item()
        done = step + 1
        last = {"loss": train_loss, "lr": scheduler.get_last_lr()[0], "tokens": n_targets}
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        # 5. evaluate
        if cfg.eval_every and done % cfg.eval_every == 0 and done != len(plan):
            last["eval_loss"] = evaluate()
        if done % cfg.log_every == 0 or "eval_loss" in last:
            log.log(done, **last)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}")
        # 6. checkpoint
        periodic_checkpoint(acc, cfg, out, done, len(plan), acc.unwrap_model(model), optimizer, scheduler, model)
    bar.close()
    train_seconds = time.perf_counter() - t_train

    final_eval = evaluate()
    seen = sum(len(train[i].input_ids) for step_batch in plan[start:] for i in step_batch)
    result = {
        "step": len(plan),
        **last,
        "eval_loss_before": first_eval,
        "eval_loss": final_eval,
        "train_seconds": train_seconds,
        "tokens_per_second": seen / max(train_seconds, 1e-9),
    }
    log.log(len(plan), eval_loss=final_eval)
    log.close()
    if cfg.save_every:
        write_checkpoint(acc, out, len(plan), acc.unwrap_model(model), optimizer, scheduler, model)
    weights = full_state_dict(acc, model)  # FSDP: the whole weights, gathered; else None (the model's own)
    if acc.is_main_process:
        save_model_dir(unwrap(acc.unwrap_model(model), merge=True), tok, out / "model", weights)
        say(
            f"saved {out / 'model'}"
            + (
                f"; held-out loss {first_eval:.4f} -> {final_eval:.4f}"
                if final_eval is not None and first_eval is not None
                else ""
            )
        )
    acc.wait_for_everyone()
    return result
