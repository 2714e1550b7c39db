"""ILQL: offline RL on logged answers and their rewards, no sampling (Snell et al. 2022; the math in
``algos/ilql.py``, the heads in ``models/ilql.py``, docs/algorithms.md "ILQL").

  1. data        every answer is one episode (prompt -> response tokens), its reward on its last token:
                 rankings -> +1 (best) .. -1 (worst rank), or a reward model's scores; demonstrations ->
                 ``demo_reward``
  2. model       the SFT model (+ LoRA) and fresh heads on its trunk: Q1, Q2, their Polyak targets, V
  3. train step  one forward per micro-batch: the trunk's hidden state at every response state s_t ->
                 the LM's logits, Q1 and Q2 over the vocabulary, the targets' Q̂ of the taken token, V(s_t)
                 and V(s_{t+1}) -> per-token loss -> Σ / (response tokens of the global batch) ->
                 backward -> clip -> step -> Polyak update of the target heads
  4. evaluate    held-out losses and, on held-out rankings, the preferred answers' margins: log-prob
                 under the ILQL policy log π + β (Q̂ − V), under the LM alone, and Σ_t (Q̂ − V)
  5. checkpoint  every ``save_every`` steps, atomically (the heads in its state), exact resume
  6. save        the LM (merged) as a Hugging Face directory + ilql_heads.safetensors + ilql.json (β)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhfkit.accel import prepare_for_training
from rlhfkit.algos.dpo import ranking_pairs
from rlhfkit.algos.ilql import ilql_loss, polyak_update, sequence_reward_of_ranks
from rlhfkit.config import ILQLConfig
from rlhfkit.data.records import Demonstration, Ranking
from rlhfkit.data.tokenize import Encoded, collate, encode_demonstration, encode_prompt, encode_response, fit
from rlhfkit.errors import UserError
from rlhfkit.models.ilql import ILQLHeads, load_ilql_heads, save_ilql_heads
from rlhfkit.models.layout import hidden_size, scored_forward
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
    save_checkpoint,
    save_model_dir,
    shard,
    world,
)
from rlhfkit.recipes.engines import micro_batch, optimizer_step

LOSSES = ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac")
METRICS = LOSSES + ("values/q", "values/target_q", "values/v", "values/advantage")  # per-token means
MARGINS = ("margin/logp", "margin/logp_lm", "margin/advantage", "accuracy")  # per held-out pair


@dataclass
class Episode:
    """One logged answer: its tokens and its reward (on the last response token)."""

    seq: Encoded
    reward: float

    @property
    def n_actions(self) -> int:
        return len(self.seq.input_ids) - self.seq.prompt_len


class ILQLModel(nn.Module):
    """The LM and the heads as one module (one DDP wrapper, one optimizer); ``forward`` returns what
    ``ilql_loss`` takes, flat over the response tokens (N)."""

    def __init__(self, lm: nn.Module, heads: ILQLHeads, beta: float):
        super().__init__()
        self.lm, self.heads, self.beta = lm, heads, beta  # beta: of generation, saved with the heads

    def embedding(self) -> torch.Tensor:
        return unwrap(self.lm).get_output_embeddings().weight  # (V, d), the Q heads' token basis

    def forward(self, input_ids, attention_mask, positions, valid, actions) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (B, L); positions (B, R): the states s_0..s_n of each response
        (position prompt_len − 1 + t), valid (B, R−1): the states that take an action; actions (N,)."""
        h, logits = scored_forward(self.lm, input_ids, attention_mask, positions)  # (B, R, d), (B, R, V)
        v_all = self.heads.value(h)  # (B, R)
        hs, emb = h[:, :-1][valid], self.embedding()  # (N, d)
        return {
            "logits": logits[:, :-1][valid],  # (N, V)
            "q1_all": self.heads.q1(hs, emb),  # (N, V)
            "q2_all": self.heads.q2(hs, emb),
            "target_q1": self.heads.target_q1.taken(hs, emb, actions),  # (N,)
            "target_q2": self.heads.target_q2.taken(hs, emb, actions),
            "v": v_all[:, :-1][valid],  # (N,) V(s_t)
            "next_v": v_all[:, 1:][valid],  # (N,) V(s_{t+1}); after the last token it is masked by done
            "hidden": hs,
        }

    def save_pretrained(self, path, **kw) -> None:
        """The LM (LoRA merged) as a Hugging Face directory, and the heads and beta beside it."""
        unwrap(self.lm, merge=True).save_pretrained(path, **kw)
        save_ilql_heads(self.heads, path, self.beta)


class Checkpointed:
    """What a checkpoint's ``model/`` holds: the LM's weights (``save_pretrained``: the adapters under LoRA)
    and the heads in ``model/ilql/`` (a folder of their own: ``load_weights`` reads the top level's
    safetensors into the LM)."""

    def __init__(self, model: ILQLModel):
        self.model = model

    def save_pretrained(self, path, **kw) -> None:
        self.model.lm.save_pretrained(path, **kw)
        (Path(path) / "ilql").mkdir()
        save_ilql_heads(self.model.heads, Path(path) / "ilql", self.model.beta)


def episode_tensors(episodes: list[Episode], pad_id: int, device) -> dict[str, torch.Tensor]:
    """A padded batch and its flat per-token tensors: states, actions, rewards, dones, and each
    token's row (``row``), for the forward of ``ILQLModel`` and ``ilql_loss``."""
    batch = collate([e.seq for e in episodes], pad_id)
    n = [e.n_actions for e in episodes]
    width = max(n) + 1  # states s_0 .. s_n of the longest response
    positions = torch.zeros(len(episodes), width, dtype=torch.long)  # (B, R)
    valid = torch.zeros(len(episodes), width - 1, dtype=torch.bool)  # (B, R-1)
    rewards = torch.zeros(len(episodes), width - 1)
    dones = torch.zeros(len(episodes), width - 1, dtype=torch.bool)
    for b, (e, k) in enumerate(zip(episodes, n)):
        last = len(e.seq.input_ids) - 1
        positions[b] = (torch.arange(width) + e.seq.prompt_len - 1).clamp(max=last)
        valid[b, :k] = True
        rewards[b, k - 1], dones[b, k - 1] = e.reward, True  # the episode ends on the last response token
    action_at = (positions[:, :-1] + 1).clamp(max=batch["input_ids"].shape[1] - 1)
    actions = batch["input_ids"].gather(1, action_at)[valid]  # (N,) the token taken in each state
    row = torch.arange(len(episodes))[:, None].expand_as(valid)[valid]  # (N,)
    out = {"positions": positions, "valid": valid, "actions": actions, "rewards": rewards[valid], "dones": dones[valid]}
    out |= {"row": row, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {k: v.to(device) for k, v in out.items()}


def rank_episodes(tok, rankings: list[Ranking], cfg: ILQLConfig, rewards: list[list[float]] | None = None):
    """Every answer of every ranking as an episode (reward from its rank, or ``rewards[g][i]``), and the
    ranking's untied pairs as (chosen, rejected, weight) indices into the returned list."""
    episodes, pairs = [], []
    for g, r in enumerate(rankings):
        first = len(episodes)
        prompt = encode_prompt(tok, r.messages)
        scores = rewards[g] if rewards is not None else sequence_reward_of_ranks(r.ranks)
        for text, reward in zip(r.responses, scores):
            p, resp, cut = fit(prompt, encode_response(tok, text), cfg.max_length)
            episodes.append(Episode(Encoded(p + resp, len(p), cut), reward))
        pairs += [(first + i, first + j, w) for _, i, j, w in ranking_pairs([r.ranks], "per_ranking")]
    return episodes, pairs


def reward_model_scores(cfg: ILQLConfig, rankings: list[Ranking], say) -> list[list[float]]:
    """The reward model's (normalised) score of every answer of every ranking, in its own tokenisation."""
    from rlhfkit.data.tokenize import encode_ranking
    from rlhfkit.models.heads import load_reward_model

    rm, rm_tok = load_reward_model(cfg.reward_model)
    rm.eval()
    seqs = [e for r in rankings for e in encode_ranking(rm_tok, r, cfg.max_length)]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            batch = collate(seqs[i : i + 8], rm_tok.pad_token_id)
            scores += rm.score(batch["input_ids"], batch["attention_mask"], batch["last_index"]).tolist()
    say(f"rewards: {cfg.reward_model}'s scores of {len(seqs)} answers (mean {sum(scores) / max(1, len(scores)):+.3f})")
    out, i = [], 0
    for r in rankings:
        out.append(scores[i : i + r.k])
        i += r.k
    return out


def load_episodes(cfg: ILQLConfig, tok, say) -> tuple[list[Episode], list[Episode], list[tuple[int, int, float]]]:
    """1. Training and held-out episodes, and the held-out pairs (indices into the held-out episodes)."""
    kind = "ranking" if cfg.records == "rankings" else "demonstration"
    train_recs, eval_recs = load_split(cfg, kind, say)
    if cfg.records == "demonstrations":

        def demos(recs: list[Demonstration]) -> list[Episode]:
            return [Episode(encode_demonstration(tok, d, cfg.max_length), cfg.demo_reward) for d in recs]

        return demos(train_recs), demos(eval_recs), []
    scores = reward_model_scores(cfg, train_recs + eval_recs, say) if cfg.reward_model else None
    train, _ = rank_episodes(tok, train_recs, cfg, scores[: len(train_recs)] if scores else None)
    held_out, pairs = rank_episodes(tok, eval_recs, cfg, scores[len(train_recs) :] if scores else None)
    return train, held_out, pairs


def train_ilql(cfg: ILQLConfig, say=print) -> dict:
    """Train ``cfg.model`` with ILQL on the logged answers in ``cfg.data``; returns the final metrics."""
    acc = make_accelerator(cfg)
    out, ckpt = prepare_out(cfg, acc)
    say = say if acc.is_main_process else (lambda *a, **k: None)
    budget = TimeBudget(cfg, acc, say)  # cfg.max_seconds from here
    rank, n_proc = world(acc)
    if cfg.batch_size < n_proc:
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {n_proc} processes")

    # 1. data (a bad file is reported before the model loads)
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    train, held_out, eval_pairs = load_episodes(cfg, tok, say)
    if empty := [e for e in train + held_out if e.seq.prompt_len == 0]:
        raise UserError(f"{len(empty)} answers have an empty prompt: ILQL needs a state before the first token")
    if cut := sum(e.seq.truncated for e in train + held_out):
        say(f"truncated {cut} of {len(train) + len(held_out)} answers to max_length={cfg.max_length}")
    mean_r = sum(e.reward for e in train) / max(1, len(train))
    say(f"ILQL: {len(train)} training and {len(held_out)} held-out answers (mean reward {mean_r:+.3f})")

    # 2. the LM (+ LoRA) and the heads on its trunk, one optimizer (the heads at head_lr)
    lm = loaded.model
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    lm = apply_lora(lm, cfg)
    prepare_for_training(lm, cfg, acc.device, say, name="policy")
    vocab = unwrap(lm).get_output_embeddings().weight.shape[0]
    torch.manual_seed(cfg.seed)
    model = ILQLModel(lm, ILQLHeads(hidden_size(lm), vocab).to(acc.device), cfg.beta)
    plan = batch_plan(len(train), cfg)
    head_params = [p for p in model.heads.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(model, cfg, len(plan), {p: cfg.head_lr or cfg.lr for p in head_params})
    model, optimizer = acc.prepare(model, optimizer)
    inner: ILQLModel = acc.unwrap_model(model)

    def token_sums(episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Σ loss over the response tokens of ``episodes`` (differentiable), Σ of every METRICS entry
        (detached), and the forward's tensors."""
        t = episode_tensors(episodes, tok.pad_token_id, acc.device)
        f = model(t["input_ids"], t["attention_mask"], t["positions"], t["valid"], t["actions"])
        parts = ilql_loss(
            f["logits"], f["q1_all"], f["q2_all"], f["target_q1"], f["target_q2"], f["v"], f["next_v"],
            t["actions"], t["rewards"], t["dones"], cfg.gamma, cfg.tau, cfg.cql_scale, cfg.awac_scale, cfg.awac_beta,
        )  # fmt: skip
        q1 = f["q1_all"].detach().gather(-1, t["actions"][:, None])[:, 0].float()
        target_q = torch.minimum(f["target_q1"], f["target_q2"]).detach().float()
        values = (parts.loss.detach(), parts.q, parts.v, parts.cql, parts.awac, q1, target_q, f["v"].detach().float())
        sums = torch.stack([x.sum() for x in (*values, parts.advantage)])  # in the order of METRICS
        return parts.loss.sum(), sums, f | t

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """4. Held-out per-token losses and values; on held-out pairs the margins of the preferred answers."""
        if not held_out:
            return {}
        model.eval()
        sums = torch.zeros(len(METRICS), device=acc.device)
        seq_stats = torch.zeros(len(held_out), 3, device=acc.device)  # Σ log π_ILQL, Σ log π, Σ (Q̂ − V)
        for i in range(rank * 4, len(held_out), 4 * n_proc):
            idx = list(range(i, min(i + 4, len(held_out))))
            _, s, f = token_sums([held_out[j] for j in idx])
            sums += s
            logits = f["logits"].float()
            q_hat = inner.heads.target_q(f["hidden"].float(), inner.embedding().float()).float()  # (N, V)
            taken = f["actions"][:, None]
            lp_lm = torch.log_softmax(logits, -1).gather(-1, taken)[:, 0]
            lp_ilql = torch.log_softmax(logits + cfg.beta * q_hat, -1).gather(-1, taken)[:, 0]  # V cancels
            adv = q_hat.gather(-1, taken)[:, 0] - f["v"].float()
            rows = torch.tensor(idx, device=acc.device)[f["row"]]
            seq_stats.index_add_(0, rows, torch.stack([lp_ilql, lp_lm, adv], -1))
        model.train()
        n_tokens = sum(e.n_actions for e in held_out)
        result = dict(zip(METRICS, (acc.reduce(sums, "sum") / n_tokens).tolist()))
        if eval_pairs:
            seq_stats = acc.reduce(seq_stats, "sum")
            c, r = [p[0] for p in eval_pairs], [p[1] for p in eval_pairs]
            w = torch.tensor([p[2] for p in eval_pairs], device=acc.device)
            margins = seq_stats[c] - seq_stats[r]  # (P, 3)
            values = torch.cat([margins, (margins[:, :1] > 0).float()], -1)  # in the order of MARGINS
            result |= dict(zip(MARGINS, ((w[:, None] * values).sum(0) / w.sum()).tolist()))
        return {f"eval_{k}": v for k, v in result.items()}

    # resume: weights (the LM's, then the heads'), optimizer, schedule, RNG
    start = 0
    if ckpt is not None:
        start, _ = load_checkpoint(ckpt, inner.lm, optimizer, scheduler)
        inner.heads.load_state_dict(load_ilql_heads(ckpt / "model" / "ilql")[0].state_dict())
        say(f"resumed from {ckpt} at step {start}")

    log = MetricsLog(out, acc, cfg, resume_step=start if ckpt else None)
    before = evaluate() if start == 0 else {}
    if before:
        log.log(0, **before)
        margin = f", log-prob margin {before['eval_margin/logp']:+.4f}" if "eval_margin/logp" in before else ""
        say(f"held-out before training: loss {before['eval_loss']:.4f}{margin}")

    t_train = time.perf_counter()
    bar = progress(len(plan), start, acc.is_main_process, "ilql")
    last: dict = {}
    for step in range(start, len(plan)):
        episodes = [train[i] for i in plan[step]]
        n_tokens = sum(e.n_actions for e in episodes)  # of the global batch: every process knows it
        sums = torch.zeros(len(METRICS), device=acc.device)
        # 3. train step
        micro = shard(list(range(len(episodes))), rank, n_proc, cfg.grad_accum)
        for j, mb in enumerate(micro):
            with micro_batch(acc, model, last=j == len(micro) - 1):
                loss_sum, metric_sums, _ = token_sums([episodes[i] for i in mb])
                acc.backward(loss_sum / n_tokens * n_proc)  # DDP averages over processes, hence × n_proc
            sums += metric_sums
        grad_norm = optimizer_step(acc, model, optimizer, cfg.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        polyak_update(inner.heads.target_q1, inner.heads.q1, cfg.polyak_alpha)
        polyak_update(inner.heads.target_q2, inner.heads.q2, cfg.polyak_alpha)
        done = step + 1
        last = dict(zip(METRICS, (acc.reduce(sums, "sum") / n_tokens).tolist()))
        last["lr"] = scheduler.get_last_lr()[0]
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        # 4. evaluate
        if cfg.eval_every and done % cfg.eval_every == 0 and done != len(plan):
            last |= evaluate()
        if done % cfg.log_every == 0 or "eval_loss" in last:
            log.log(done, **last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", v=f"{last['values/v']:+.3f}")
        # 5. checkpoint
        periodic_checkpoint(acc, cfg, out, done, len(plan), Checkpointed(inner), optimizer, scheduler)
        if budget.spent(done, len(plan)):
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train

    final = evaluate()
    log.log(budget.steps(len(plan)), **final)
    log.close()
    result = {"step": len(plan), **last, **final, "train_seconds": train_seconds, **budget.result()}
    result |= {f"{k}_before": v for k, v in before.items()}
    # 6. save: the LM as a Hugging Face directory, the heads and β beside it
    if acc.is_main_process:
        if cfg.save_every:
            save_checkpoint(out, budget.steps(len(plan)), Checkpointed(inner), optimizer, scheduler)
        save_model_dir(inner, tok, out / "model")  # atomic: the LM and the heads appear together
        got = f"; held-out log-prob margin {final['eval_margin/logp']:+.4f}" if "eval_margin/logp" in final else ""
        say(f"saved {out / 'model'} with ILQL heads (beta={cfg.beta}){got}")
    acc.wait_for_everyone()
    return result
