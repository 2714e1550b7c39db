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
  3. score         cut after the first EOS; RM score or reward_fn; score clipping; missing-EOS penalty
  4. forwards      log-probs of policy and reference and the critic's values, without grad, in
                   the training precision (the engine's log-probs are NOT reused for the ratio)
  5. rewards       r_t = −β (log π − log π_ref), plus the score on the last response token
  6. advantages    GAE(γ, λ), then whitened over the batch
  7. PPO           ppo_epochs × num_minibatches steps of policy loss + vf_coef · value loss
                   (+ ptx_coef · pretraining NLL), one global gradient-norm clip, AdamW
  8. log           KL controller update, metrics.jsonl line, checkpoint

Speed: each sequence's trunk runs once per model per phase; only the hidden states at response
positions go through the (large) LM head; the log-probs divide the logits by the sampling
temperature [N-details, "scale the logits by the sampling temperature"].
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rlhfkit.algos.ppo import (AdaptiveKLController, FixedKLController, apply_missing_eos_penalty, clip_scores,
                               compute_gae, compute_rewards, explained_variance, kl_k3,
                               logprobs_from_logits, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss,
                               truncate_after_eos, whiten_rewards)
from rlhfkit.config import PPOConfig
from rlhfkit.data.records import Prompt
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import UserError
from rlhfkit.models.heads import load_reward_model
from rlhfkit.models.loading import load_causal_lm, resolve_precision
from rlhfkit.recipes.common import (compile_blocks, MetricsLog, apply_lora, batch_plan, load_checkpoint, make_accelerator,
                                    make_optimizer, merged, prepare_out, progress, save_checkpoint, training_attention)
from rlhfkit.rollout import Engine, SamplingParams

RewardFn = Callable[[list[Prompt], list[str], list[bool]], Sequence[float]]


# ---------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def bf16_matmul_weights(model: nn.Module) -> None:
    """Store a frozen model's Linear weights in bf16: exactly the values bf16 autocast casts them
    to at every forward, so its forwards under autocast give bitwise the same results, with half
    the memory for those weights and no per-forward cast.

    For the reference: with SmolLM2-135M, 214 MB less and ~0.15 s less per iteration. The
    embedding and the norms stay fp32 (the residual stream stays fp32 as in the policy's forward),
    and so does a head tied to the embedding (converting it would convert the embedding too), so
    the reference's log-probs equal the policy's at step 0 — KL exactly 0. Casting the whole model
    to bf16 instead would put the residual stream in bf16: a KL of ±0.9 nats per sequence at step 0.
    """
    tied = model.get_input_embeddings().weight
    converted = set()
    for m in model.modules():
        if type(m) is nn.Linear and m.weight is not tied:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data = p.data.to(torch.bfloat16)
                    converted.add(id(p))
    # The rest gets memory of its own: the checkpoint is memory-mapped, and while any tensor still
    # views the file, every page of it that was read (all of them, by the conversion) stays in
    # RSS — the 540 MB fp32 file next to the 214 MB of bf16 copies.
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in converted:
            t.data = t.data.clone()


@dataclass
class Batch:
    """A rollout batch laid out for forwards. N sequences, L = longest query + R.

    Row i is ``query_i + response_i`` right-padded; ``positions[i, t]`` is the index whose hidden
    state predicts response token t (``len(query_i) - 1 + t``), so the LM head and the value head
    run on ``(N, R, d)`` instead of ``(N, L, d)``.
    """

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    positions: torch.Tensor  # (N, R)
    response: torch.Tensor  # (N, R) token ids, pad after EOS
    response_mask: torch.Tensor  # (N, R) bool, 1 up to and including EOS
    last_index: torch.Tensor  # (N,) index of the last response token in input_ids

    def rows(self, idx: torch.Tensor) -> "Batch":
        """Rows ``idx``, trimmed to their own longest sequence and response."""
        mask = self.response_mask[idx]
        R = int(mask.sum(1).max())
        L = int(self.last_index[idx].max()) + 1
        return Batch(self.input_ids[idx, :L], self.attention_mask[idx, :L], self.positions[idx, :R].clamp(max=L - 1),
                     self.response[idx, :R], mask[:, :R], self.last_index[idx])


def make_batch(queries: list[list[int]], response: torch.Tensor, response_mask: torch.Tensor, pad_id: int) -> Batch:
    """Right-padded ``query + response`` rows; the response columns are trimmed to the longest."""
    lengths = response_mask.long().sum(1)  # (N,)
    R = int(lengths.max())
    response, response_mask = response[:, :R], response_mask[:, :R]
    q = torch.tensor([len(x) for x in queries])  # (N,)
    L = int((q + lengths).max())
    N = len(queries)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(N, L, dtype=torch.long)
    for i, (query, n) in enumerate(zip(queries, lengths.tolist())):
        input_ids[i, : len(query)] = torch.tensor(query)
        input_ids[i, len(query) : len(query) + n] = response[i, :n]
        attention_mask[i, : len(query) + n] = 1
    positions = (q - 1).unsqueeze(1) + torch.arange(R).unsqueeze(0)  # (N, R)
    positions = positions.clamp(max=L - 1)  # padding columns of short responses: any valid index
    return Batch(input_ids, attention_mask, positions, response, response_mask, q + lengths - 1)


def cut_responses(completions, eos_ids, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's samples as ``(response (N, R), response_mask (N, R) bool, ended (N,) bool)``.

    Everything after the first EOS is cut [N-details, "EOS trick"]: with ``ignore_eos`` (or stop
    strings) tokens may follow it, and they are not the policy's answer. ``ended`` says whether a
    response produced EOS at all (the missing-EOS penalty applies to the others).
    Pitfall: SmolLM2's pad id *is* its EOS, so the padding of shorter samples is first filled with
    a non-EOS id — otherwise a sample cut at 'length' would look finished.
    """
    eos = sorted(eos_ids)
    filler = next(i for i in range(len(eos) + 1) if i not in eos)
    lengths = torch.tensor([len(c.token_ids) for c in completions])  # (N,)
    R = int(lengths.max())
    response = torch.full((len(completions), R), filler, dtype=torch.long)
    for i, c in enumerate(completions):
        response[i, : len(c.token_ids)] = torch.tensor(c.token_ids)
    response, response_mask, ended = truncate_after_eos(response, eos, pad_id)
    response_mask &= torch.arange(R)[None, :] < lengths[:, None]
    return response.masked_fill(~response_mask, pad_id), response_mask, ended


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, d), positions (B, R) -> (B, R, d)."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def policy_hidden(model: nn.Module, b: Batch) -> torch.Tensor:
    """The policy trunk's last hidden states at the response positions: (B, R, d)."""
    trunk = _unwrap(model).model
    hidden = trunk(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state  # (B, L, d)
    return _gather(hidden, b.positions)


def response_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """LM head on response positions only: (B, R, d) -> (B, R, V)."""
    return _unwrap(model).lm_head(h)


class Critic(nn.Module):
    """V(query, response[:t]) for every response position t.

    kind 'rm': a reward model (trunk + linear head) applied at every position; kind
    'policy_head': a linear head on the policy's hidden states (``values(..., hidden=h)``).
    """

    def __init__(self, kind: str, seq_model: nn.Module | None = None, head: nn.Linear | None = None):
        super().__init__()
        self.kind = kind
        self.seq_model = seq_model  # AutoModelForSequenceClassification (maybe peft-wrapped)
        self.head = head  # policy_head only

    def values(self, b: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R) float32 values; ``hidden`` = the policy's (B, R, d) states for 'policy_head'."""
        if self.kind == "policy_head":
            return self.head(hidden).squeeze(-1).float()
        base = _unwrap(self.seq_model)
        trunk = getattr(base, base.base_model_prefix)
        h = trunk(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state  # (B, L, d)
        # on the scale of the rewards: the RM's scores are normalised by its stored offset, so its
        # raw head output would overestimate every value by that offset (see policy_head's init)
        offset = float(getattr(base.config, "reward_offset", 0.0) or 0.0)
        return base.score(_gather(h, b.positions)).squeeze(-1).float() - offset  # (B, R)

    def save(self, path: Path, merge: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "policy_head":
            from safetensors.torch import save_file

            save_file({"weight": self.head.weight.detach().contiguous()}, str(path / "value_head.safetensors"))
        else:
            (merged(self.seq_model) if merge else self.seq_model).save_pretrained(path, safe_serialization=True)

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        if self.kind == "policy_head":
            self.head.load_state_dict(load_file(str(path / "value_head.safetensors")))
            return
        _load_weights(self.seq_model, path)


def _load_weights(model: nn.Module, path: Path) -> None:
    """Weights saved by ``save_pretrained`` (a full model or peft adapters) into ``model``."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the critic (missing {missing[:3]}, unexpected {unexpected[:3]})")


class _Checkpoint(nn.Module):
    """What ``save_checkpoint`` writes as ``model/``: the policy there, the critic in ``model/critic``."""

    def __init__(self, policy: nn.Module, critic: Critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def save_pretrained(self, path, **kw) -> None:
        self.policy.save_pretrained(path, **kw)
        self.critic.save(Path(path) / "critic")


# ---------------------------------------------------------------------------------------------
# forwards without grad, in chunks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout_forwards(policy, ref, critic: Critic, batch: Batch, temperature: float, chunk: int, autocast,
                     lora_ref: bool) -> dict[str, torch.Tensor]:
    """Old log-probs, entropy, values and reference log-probs of the whole rollout batch.

    ``ref=None`` with ``lora_ref``: the reference is the policy with its adapters disabled.
    """
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "values": [], "ref_logprobs": []}
    N, R = batch.response.shape

    def pad(x: torch.Tensor) -> torch.Tensor:  # (b, r) -> (b, R): chunks are trimmed to their own length
        return torch.nn.functional.pad(x, (0, R - x.shape[1]))

    for start in range(0, N, chunk):
        b = batch.rows(torch.arange(start, min(start + chunk, N)))
        # one autocast context per model: its cache of bf16 weight casts is freed on exit
        with autocast():
            h = policy_hidden(policy, b)  # (b, r, d)
            logits = response_logits(policy, h)  # (b, r, V)
            logprobs, entropy = logprobs_and_entropy(logits, b.response, temperature)
            out["logprobs"].append(pad(logprobs))
            out["entropy"].append(pad(entropy))
            del logits
            if critic.kind == "policy_head":
                out["values"].append(pad(critic.values(b, hidden=h)))
        if critic.kind == "rm":
            with autocast():
                out["values"].append(pad(critic.values(b)))
        with autocast():
            if lora_ref:
                with policy.disable_adapter():
                    ref_logits = response_logits(policy, policy_hidden(policy, b))
            else:
                ref_logits = response_logits(ref, policy_hidden(ref, b))
            out["ref_logprobs"].append(pad(logprobs_from_logits(ref_logits, b.response, temperature)))
            del ref_logits
    return {k: torch.cat(v) * batch.response_mask for k, v in out.items()}


@torch.no_grad()
def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` in one pass over the vocabulary.

    logits (B, R, V), tokens (B, R) -> two (B, R) float32. The log-probs are computed with the
    same ops as ``logprobs_from_logits`` (bitwise equal: the reference's log-probs come from that
    function, and equal weights must give a KL of exactly 0); the entropy reuses their logsumexp,
    H = lse − Σ_v softmax(z)_v z_v. Row by row: one (R, V) float32 slice at a time. The two
    separate functions cost 0.31 s per 16 × 64 tokens of SmolLM2 (V = 49152), this one 0.2 s.
    """
    lps, ents = [], []
    for row_logits, row_tokens in zip(logits, tokens):  # (R, V), (R,)
        z = row_logits.float() / temperature  # (R, V)
        lse = torch.logsumexp(z, dim=-1)  # (R,)
        lps.append(z.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - lse)
        p = torch.exp(z - lse.unsqueeze(-1))  # softmax(z)
        ents.append(lse - (p * z).sum(-1))
    return torch.stack(lps), torch.stack(ents)


@torch.no_grad()
def rm_scores(rm, batch: Batch, chunk: int, autocast) -> torch.Tensor:
    """Normalised reward-model scores (N,), read at each response's last token (its EOS)."""
    scores = []
    for start in range(0, len(batch.response), chunk):
        b = batch.rows(torch.arange(start, min(start + chunk, len(batch.response))))
        with autocast():
            scores.append(rm.score(b.input_ids, b.attention_mask, b.last_index).float())
    return torch.cat(scores)


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


def load_ptx(cfg: PPOConfig, tok) -> list[list[int]]:
    """PPO-ptx corpus chunks (token ids), cut like ``rlhfkit pretrain`` does."""
    from rlhfkit.data.loaders import load_records
    from rlhfkit.recipes.pretrain import chunk_corpus

    docs = load_records(cfg.ptx_data, "text", fields=cfg.fields or None).records
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


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None, interrupt_after: int | None = None,
              say=print) -> dict:
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

    # 1. models: policy (+ LoRA), reference, critic, reward model
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    pad_id = tok.pad_token_id
    policy = loaded.model.to(device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy = apply_lora(policy, cfg)
    if compile_blocks(policy, cfg, device, say):
        say("compiling the policy's transformer blocks (torch.compile; once per machine, cached)")
    lora_ref = cfg.lora
    ref = None
    if not lora_ref:  # the frozen SFT model; with LoRA it is the policy with adapters disabled
        ref = load_causal_lm(cfg.model).model.to(device).requires_grad_(False).eval()
        if bf16:
            bf16_matmul_weights(ref)
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
        critic = Critic("rm", seq_model=apply_lora(seq_model, cfg, task_type="SEQ_CLS").to(device))
        compile_blocks(critic.seq_model, cfg, device, say)
    rm = None
    if reward_fn is None:
        rm, rm_tok = load_reward_model(cfg.reward_model, dtype=torch.bfloat16 if bf16 else torch.float32)
        if rm_tok.get_vocab() != tok.get_vocab():
            raise UserError(f"reward_model={cfg.reward_model}: its tokenizer differs from the policy's ({cfg.model})")
        rm = rm.to(device).requires_grad_(False).eval()
    policy.train()
    critic.train()
    engine = Engine(policy, tok, precision=precision)
    if not engine.eos_ids:
        raise UserError(f"{cfg.model}: the tokenizer has no EOS token; responses could never end")

    # 2. prompts, batch plan (one batch of prompts per iteration), PPO-ptx corpus
    prompts = load_prompts(cfg, say)
    queries = [encode_prompt(tok, p.messages) for p in prompts]
    cut = sum(len(q) > cfg.max_prompt_length for q in queries)
    if cut:
        say(f"{cut} prompts longer than max_prompt_length={cfg.max_prompt_length} keep their last tokens")
    queries = [q[-cfg.max_prompt_length :] for q in queries]
    gold = all(p.meta.get("instructions") for p in prompts)
    plan = batch_plan(len(prompts), cfg)
    ptx = load_ptx(cfg, tok) if cfg.ptx_data and cfg.ptx_coef > 0 else None
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
    log = MetricsLog(out, acc.is_main_process, resume_step=start if ckpt else None)
    trainable = [p for p in both.parameters() if p.requires_grad]

    bar = progress(len(plan), start, True, "ppo")
    last: dict = {}
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
                micro = [m for m in mb.chunk(max(1, min(cfg.grad_accum, len(mb))))]
                for m in micro:
                    b = batch.rows(m)
                    cols = b.response.shape[1]
                    m_mask = b.response_mask
                    weight = m_mask.sum() / n_tokens  # token-weighted: micro-batching leaves the loss unchanged
                    old_lp, adv = fw["logprobs"][m, :cols], advantages[m, :cols]
                    old_v, ret = fw["values"][m, :cols], returns[m, :cols]
                    T = b.input_ids.shape[1]  # training_attention: the math kernel for short rows on CPU
                    if critic.kind == "rm":
                        # separate models, separate graphs: the critic's forward + backward first,
                        # then the policy's, so only one graph (and one bf16 weight cast) is alive
                        with autocast(), training_attention(T, device):
                            values = critic.values(b)
                        vl = ppo_value_loss(values, old_v, ret, m_mask, cfg.cliprange_value)
                        (weight * cfg.vf_coef * vl.loss).backward()
                        with autocast(), training_attention(T, device):
                            h = policy_hidden(policy, b)  # (b, r, d)
                            new_logprobs = logprobs_from_logits(response_logits(policy, h), b.response, cfg.temperature)
                        pl = ppo_policy_loss(new_logprobs, old_lp, adv, m_mask, cfg.cliprange)
                        (weight * pl.loss).backward()
                    else:  # one trunk forward gives both the log-probs and the values
                        with autocast(), training_attention(T, device):
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
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
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
            "score": float(scores.mean()), "score_raw": float(raw.mean()),
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
        if interrupt_after is not None and done >= interrupt_after:  # tests: simulate a crash here
            bar.close()
            return {"step": done, **last}
    bar.close()
    seconds = time.perf_counter() - t_run

    # save: checkpoint (resumable), then the policy merged as a plain HF directory, and the critic
    result = {"step": len(plan), **last, "train_seconds": seconds}
    if cfg.save_every:
        save_checkpoint(out, len(plan), _Checkpoint(policy, critic), optimizer, scheduler,
                        extra={"kl_ctl": kl_ctl.state_dict()})
    final = merged(policy)
    final.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    critic.save(out / "critic", merge=True)
    if critic.kind == "rm":
        tok.save_pretrained(out / "critic")
    say(f"saved {out / 'model'} and {out / 'critic'}; last score {last.get('score', float('nan')):.4f}, "
        f"KL {last.get('kl', float('nan')):.4f}")
    return result
