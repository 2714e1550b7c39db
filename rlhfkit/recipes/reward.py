"""Step 2 of the recipe: a reward model from labelers' rankings of K = 2…9 answers
(InstructGPT §3.5 "Reward modeling").

  1. model        the SFT model's trunk + a scalar head N(0, 1/(d+1)) reading the EOS
  2. data         each ranking -> K tokenised (prompt, response) sequences
  3. batch plan   global batches of *prompts* (each brings all its K responses)
  4. train step   all K responses of a prompt in one forward -> per-prompt mean over its
                  K(K−1)/2 pairs of −log σ(r_better − r_worse) -> mean over prompts
  5. evaluate     pairwise accuracy; top-1 accuracy and Kendall τ when K > 2
  6. normalise    offset so the mean score of the reference (best-ranked) answers is 0
  7. save         a Hugging Face sequence-classification directory (see models/heads.py)
"""

from __future__ import annotations

import time

import torch

from rlhfkit.accel import prepare_for_training
from rlhfkit.algos.losses import pairwise_accuracy, ranking_loss, ranking_metrics
from rlhfkit.config import RewardConfig
from rlhfkit.data.tokenize import Encoded, collate, collate_shared_prompt, encode_ranking, length_groups
from rlhfkit.feedback.labelers import ranks_from_scores
from rlhfkit.models.heads import RewardModel, load_reward_model
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

Group = tuple[list[Encoded], list[int]]  # the K sequences of one prompt and their ranks
SHARE_MIN_SAVING = 0.1  # share a prompt across its K responses when that saves >= 10 % of the tokens


def score_groups(
    model, groups: list[Group], pad_id: int, device, share_prompt: bool = True, one_forward: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every response of ``groups``. Returns scores (N,), ranks (N,), group (N,).

    ``share_prompt``: the K responses of a prompt sit in one row after a single copy of the prompt
    (``collate_shared_prompt``): the same scores as K separate rows, with the prompt's tokens
    computed once instead of K times — used when that saves at least ``SHARE_MIN_SAVING`` of the
    tokens (a near-empty prompt saves nothing and the longer rows cost more attention). Otherwise
    one row per response. Either way, rows of similar length share a forward (less padding);
    ``one_forward``: all rows share one (FSDP: each process must run as many forwards as the others).
    """
    groups_of = (lambda lengths: [list(range(len(lengths)))]) if one_forward else length_groups
    seqs = [e for g, _ in groups for e in g]
    ranks = torch.tensor([r for _, rs in groups for r in rs], device=device)
    group = torch.tensor([gi for gi, (g, _) in enumerate(groups) for _ in g], device=device)
    scores = torch.zeros(len(seqs), device=device)
    saved = sum((len(g) - 1) * g[0].prompt_len for g, _ in groups)
    if share_prompt and saved >= SHARE_MIN_SAVING * sum(len(e.input_ids) for e in seqs):
        first = [0]
        for g, _ in groups:
            first.append(first[-1] + len(g))
        lengths = [g[0].prompt_len + sum(len(e.input_ids) - e.prompt_len for e in g) for g, _ in groups]
        for part in groups_of(lengths):
            batch, where = collate_shared_prompt([groups[gi][0] for gi in part], pad_id)
            rows = torch.tensor([r for r, _ in where], device=device)
            cols = torch.tensor([c for _, c in where], device=device)
            part_scores = model(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                cols,
                position_ids=batch["position_ids"].to(device),
                row_index=rows,
            )
            index = torch.tensor([i for gi in part for i in range(first[gi], first[gi + 1])], device=device)
            scores = scores.index_put((index,), part_scores)
        return scores, ranks, group
    for part in groups_of([len(e.input_ids) for e in seqs]):
        batch = collate([seqs[i] for i in part], pad_id)
        part_scores = model(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["last_index"].to(device)
        )
        scores = scores.index_put((torch.tensor(part, device=device),), part_scores)
    return scores, ranks, group


def gold_of(record, k: int) -> list[float] | None:
    """The gold-rubric scores a simulated or gold labeler stored with a ranking
    (``meta["gold"]``, one per response), or None (people's rankings have none)."""
    gold = record.meta.get("gold")
    if isinstance(gold, list) and len(gold) == k and all(isinstance(g, (int, float)) for g in gold):
        return [float(g) for g in gold]
    return None


@torch.no_grad()
def evaluate_rm(
    model,
    groups: list[Group],
    pad_id: int,
    device,
    batch_prompts: int = 8,
    share_prompt: bool = True,
    gold: list[list[float] | None] | None = None,
) -> dict[str, float]:
    """Pairwise accuracy over all untied pairs; top-1 accuracy and Kendall τ over prompts with K > 2.

    With ``gold`` (per group: the gold-rubric scores of its responses, or None): also
    ``gold_accuracy``, the share of pairs with different gold scores that the RM orders like the
    rubric. The labeler's own noise caps ``accuracy``; this measures what the RM learned of the
    rubric behind it (a simulated labeler's rankings only)."""
    was_training = model.training
    model.eval()
    correct = pairs = top1 = taus = n_big = gold_correct = gold_pairs = 0.0
    for i in range(0, len(groups), batch_prompts):
        chunk = groups[i : i + batch_prompts]
        scores, _, group = score_groups(model, chunk, pad_id, device, share_prompt)
        for gi, (_, ranks) in enumerate(chunk):
            mine = scores[group == gi].tolist()
            m = ranking_metrics(mine, ranks)
            correct += m["pair_correct"]
            pairs += m["pairs"]
            if len(ranks) > 2:
                n_big += 1
                top1 += m["top1"]
                taus += 0.0 if m["kendall_tau"] != m["kendall_tau"] else m["kendall_tau"]
            g = gold[i + gi] if gold else None
            if g is not None:
                gm = ranking_metrics(mine, ranks_from_scores(g))
                gold_correct += gm["pair_correct"]
                gold_pairs += gm["pairs"]
    model.train(was_training)
    out = {"accuracy": correct / max(pairs, 1), "pairs": pairs}
    if n_big:
        out |= {"top1_accuracy": top1 / n_big, "kendall_tau": taus / n_big}
    if gold_pairs:
        out |= {"gold_accuracy": gold_correct / gold_pairs, "gold_pairs": gold_pairs}
    return out


def train_reward_model(cfg: RewardConfig, say=print) -> dict:
    acc = make_accelerator(cfg)
    out, ckpt = prepare_out(cfg, acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    rank, n_proc = world(acc)

    # 1. data (a bad file is reported before the model loads), then the model: trunk + fresh
    #    head (or a saved RM's head, to continue training it)
    train_recs, eval_recs = load_split(cfg, "ranking", say)
    check_batch(acc, cfg, len(train_recs))
    together = lockstep(acc)  # FSDP: one forward per micro-batch on every process (see score_groups)
    rm, tok = load_reward_model(cfg.model)
    pad_id = tok.pad_token_id
    if not cfg.chat_template:
        tok.chat_template = None
    if cfg.gradient_checkpointing:
        rm.seq_model.gradient_checkpointing_enable()
    rm.seq_model = apply_lora(rm.seq_model, cfg, task_type="SEQ_CLS")
    compiled = prepare_for_training(rm.seq_model, cfg, acc.device, say, name="reward model").blocks > 0

    # 2. data: K tokenised sequences per ranking
    train: list[Group] = [(encode_ranking(tok, r, cfg.max_length), list(r.ranks)) for r in train_recs]
    held_out: list[Group] = [(encode_ranking(tok, r, cfg.max_length), list(r.ranks)) for r in eval_recs]
    held_gold = [gold_of(r, r.k) for r in eval_recs]
    cut = sum(e.truncated for g, _ in train + held_out for e in g)
    if cut:
        say(
            f"truncated {cut} responses to max_length={cfg.max_length} "
            "(prompt cut from the left first; the EOS is kept)"
        )
    ks = sorted({len(g) for g, _ in train})
    say(f"reward model: {len(train)} training and {len(held_out)} held-out rankings, K in {ks}")

    # 3. batch plan, optimizer, accelerate, resume
    plan = batch_plan(len(train), cfg)
    optimizer, scheduler = make_optimizer(rm, cfg, len(plan))
    rm, optimizer = prepare_models(acc, cfg, rm, optimizer)
    start = 0
    if ckpt is not None:
        start, _ = load_checkpoint(ckpt, acc.unwrap_model(rm).seq_model, optimizer, scheduler, acc, rm)
        say(f"resumed from {ckpt} at step {start}")
    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    before = (
        evaluate_rm(rm, held_out, pad_id, acc.device, share_prompt=cfg.share_prompt, gold=held_gold)
        if held_out and start == 0
        else None
    )
    if before:
        log.log(0, **{f"eval_{k}": v for k, v in before.items()})
        say(f"held-out accuracy before training: {before['accuracy']:.3f}" + _gold_note(before))

    t_train = time.perf_counter()
    bar = progress(len(plan), start, acc.is_main_process, "rm")
    rm.train()
    last: dict = {}
    first_step_seconds = None
    for step in range(start, len(plan)):
        batch = plan[step]
        n_prompts = len(batch)  # every prompt weighs the same: divide by the global prompt count
        loss_sum = torch.zeros((), device=acc.device)
        correct = torch.zeros((), device=acc.device)
        n_pairs = torch.zeros((), device=acc.device)
        micro = shard(batch, rank, n_proc, cfg.grad_accum)
        # 4. train step: all K responses of each prompt in one forward
        for j, mb in enumerate(micro):
            with micro_batch(acc, rm, last=j == len(micro) - 1):
                mine = [train[i] for i in mb]
                scores, ranks, group = score_groups(rm, mine, pad_id, acc.device, cfg.share_prompt, together)
                per_prompt, _ = ranking_loss(scores, ranks, group)
                acc.backward(per_prompt.sum() / n_prompts * n_proc)
            loss_sum += per_prompt.detach().sum()
            right, pairs = pairwise_accuracy(scores.detach(), ranks, group)
            correct += right
            n_pairs += pairs
        grad_norm = optimizer_step(acc, rm, optimizer, cfg.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if step == start:
            first_step_seconds = time.perf_counter() - t_train  # includes torch.compile's one-time work
        last = {
            "loss": (acc.reduce(loss_sum, "sum") / n_prompts).item(),
            "accuracy": (acc.reduce(correct, "sum") / acc.reduce(n_pairs, "sum").clamp(min=1)).item(),
            "lr": scheduler.get_last_lr()[0],
        }
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        # 5. evaluate
        if cfg.eval_every and done % cfg.eval_every == 0 and held_out and done != len(plan):
            last |= {
                f"eval_{k}": v
                for k, v in evaluate_rm(
                    rm, held_out, pad_id, acc.device, share_prompt=cfg.share_prompt, gold=held_gold
                ).items()
            }
        if done % cfg.log_every == 0 or "eval_accuracy" in last:
            log.log(done, **last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
        seq_model = acc.unwrap_model(rm).seq_model
        periodic_checkpoint(acc, cfg, out, done, len(plan), seq_model, optimizer, scheduler, rm, "seq_model.")
    bar.close()
    train_seconds = time.perf_counter() - t_train

    final = (
        evaluate_rm(rm, held_out, pad_id, acc.device, share_prompt=cfg.share_prompt, gold=held_gold) if held_out else {}
    )
    n_seen = sum(len(b) for b in plan[start:])
    result = {
        "step": len(plan),
        **last,
        **{f"eval_{k}": v for k, v in final.items()},
        "train_seconds": train_seconds,
        "prompts_per_second": n_seen / max(train_seconds, 1e-9),
        "compiled": compiled,
        "first_step_seconds": first_step_seconds,
    }
    if before:
        result["eval_accuracy_before"] = before["accuracy"]
        if "gold_accuracy" in before:
            result["eval_gold_accuracy_before"] = before["gold_accuracy"]

    # 6. normalise: the mean score of the reference (best-ranked) answers becomes 0
    model: RewardModel = acc.unwrap_model(rm)
    if cfg.normalize:
        offset = reference_offset(model, train, pad_id, acc.device)
        model.config.reward_offset = offset
        result["reward_offset"] = offset
    log.log(len(plan), **{f"eval_{k}": v for k, v in final.items()}, reward_offset=model.offset)
    log.close()

    # 7. save a plain Hugging Face directory
    if cfg.save_every:
        write_checkpoint(acc, out, len(plan), model.seq_model, optimizer, scheduler, rm, "seq_model.")
    weights = full_state_dict(acc, rm, "seq_model.")  # FSDP: the whole weights, gathered; else None
    if acc.is_main_process:
        seq = unwrap(model.seq_model, merge=True)
        seq.config.reward_offset = model.offset
        save_model_dir(seq, tok, out / "model", weights)
        say(
            f"saved {out / 'model'}; held-out accuracy {final.get('accuracy', float('nan')):.3f}{_gold_note(final)}; "
            f"offset {model.offset:+.4f}"
        )
    acc.wait_for_everyone()
    return result


def _gold_note(metrics: dict) -> str:
    return f" (against the gold rubric: {metrics['gold_accuracy']:.3f})" if "gold_accuracy" in metrics else ""


@torch.no_grad()
def reference_offset(model: RewardModel, groups: list[Group], pad_id: int, device, max_prompts: int = 512) -> float:
    """Mean raw score of the best-ranked answer of (up to ``max_prompts``) training prompts."""
    was_training = model.training
    model.eval()
    best = [([g[ranks.index(min(ranks))]], [0]) for g, ranks in groups[:max_prompts]]
    total, n = 0.0, 0
    for i in range(0, len(best), 16):
        scores, _, _ = score_groups(model, best[i : i + 16], pad_id, device)
        total += scores.sum().item()
        n += len(scores)
    model.train(was_training)
    return total / max(n, 1)
