"""PPO's models and their forwards: loading them (policy, reference, critic, reward model, the
rollout generator), the rollout batch layout, the critic, and the no-grad forwards of one iteration
(policy and reference log-probs, entropy, values, reward-model scores).

The loop that uses them is ``rlhfkit/recipes/ppo.py``; the math is ``rlhfkit/algos/ppo.py``.
Speed: each sequence's trunk runs once per model per phase; only the hidden states at response
positions go through the (large) LM head. No model layout is assumed: the trunk, head and the
family's logit post-processing come from ``rlhfkit.models.layout``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.accel import prepare_for_inference, prepare_for_training
from rlhfkit.algos.logprobs import logprobs_and_entropy, logprobs_from_logits
from rlhfkit.algos.ppo import truncate_after_eos
from rlhfkit.config import PPOConfig
from rlhfkit.errors import UserError
from rlhfkit.models.heads import RewardModel, load_reward_model
from rlhfkit.models.layout import gather_positions, hidden_size, is_sharded, scored_forward, trunk
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.lora import unwrap
from rlhfkit.recipes.common import apply_lora, load_weights
from rlhfkit.recipes.engines import engine
from rlhfkit.rollout import Generator, make_generator


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

    def rows(self, idx: torch.Tensor) -> Batch:
        """Rows ``idx``, trimmed to their own longest sequence and response."""
        mask = self.response_mask[idx]
        R = int(mask.sum(1).max())
        L = int(self.last_index[idx].max()) + 1
        return Batch(
            self.input_ids[idx, :L],
            self.attention_mask[idx, :L],
            self.positions[idx, :R].clamp(max=L - 1),
            self.response[idx, :R],
            mask[:, :R],
            self.last_index[idx],
        )


def make_batch(queries: list[list[int]], response: torch.Tensor, response_mask: torch.Tensor, pad_id: int) -> Batch:
    """Right-padded ``query + response`` rows; the response columns are trimmed to the longest.

    Every tensor is made on ``response``'s device (the policy's, see ``cut_responses``): the rows
    are laid out in Python and each tensor is created there once, with ``device=``.
    """
    device = response.device
    lengths = response_mask.long().sum(1)  # (N,)
    R = int(lengths.max())
    response, response_mask = response[:, :R], response_mask[:, :R]
    n_resp, rows = lengths.tolist(), response.tolist()
    q_len = [len(x) for x in queries]
    L = max(a + b for a, b in zip(q_len, n_resp))
    ids = [query + row[:n] + [pad_id] * (L - len(query) - n) for query, row, n in zip(queries, rows, n_resp)]
    attn = [[1] * (len(query) + n) + [0] * (L - len(query) - n) for query, n in zip(queries, n_resp)]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)  # (N, L)
    attention_mask = torch.tensor(attn, dtype=torch.long, device=device)  # (N, L)
    q = torch.tensor(q_len, dtype=torch.long, device=device)  # (N,)
    positions = (q - 1).unsqueeze(1) + torch.arange(R, device=device).unsqueeze(0)  # (N, R)
    positions = positions.clamp(max=L - 1)  # padding columns of short responses: any valid index
    return Batch(input_ids, attention_mask, positions, response, response_mask, q + lengths - 1)


def cut_responses(
    completions, eos_ids, pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's samples as ``(response (N, R), response_mask (N, R) bool, ended (N,) bool)``,
    made on ``device`` (PPO passes the policy's: every later tensor of the batch follows them).

    Everything after the first EOS is cut [N-details, "EOS trick"]: with ``ignore_eos`` (or stop
    strings) tokens may follow it, and they are not the policy's answer. ``ended`` says whether a
    response produced EOS at all (the missing-EOS penalty applies to the others).
    Pitfall: SmolLM2's pad id *is* its EOS, so the padding of shorter samples is first filled with
    a non-EOS id — otherwise a sample cut at 'length' would look finished.
    """
    eos = sorted(eos_ids)
    filler = next(i for i in range(len(eos) + 1) if i not in eos)
    n_tokens = [len(c.token_ids) for c in completions]
    R = max(n_tokens)
    rows = [list(c.token_ids) + [filler] * (R - n) for c, n in zip(completions, n_tokens)]
    lengths = torch.tensor(n_tokens, dtype=torch.long, device=device)  # (N,)
    response = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(completions), R)
    response, response_mask, ended = truncate_after_eos(response, eos, pad_id)
    response_mask &= torch.arange(R, device=device)[None, :] < lengths[:, None]
    return response.masked_fill(~response_mask, pad_id), response_mask, ended


def policy_forward(model: nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's last hidden states and logits at the response positions: (B, R, d), (B, R, V).

    The logits are the model's own (``rlhfkit.models.layout``: Gemma's soft-capping included), so
    the log-probs PPO trains on are those of ``model(input_ids).logits``; the LM head runs on the
    response positions only wherever the model's layout allows it.
    """
    return scored_forward(model, b.input_ids, b.attention_mask, b.positions)


class Critic(nn.Module):
    """V(query, response[:t]) for every response position t.

    kind 'rm': a reward model (trunk + linear head) applied at every position; kind
    'policy_head': a linear head on the policy's hidden states (``values(..., hidden=h)``); kind
    'none': no critic (RLOO, GRPO) — no parameters, nothing saved, no values.
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
        base = unwrap(self.seq_model)
        # on the scale of the rewards: the RM's scores are normalised by its stored offset, so its
        # raw head output would overestimate every value by that offset (see policy_head's init)
        offset = float(getattr(base.config, "reward_offset", 0.0) or 0.0)
        if is_sharded(base):  # FSDP2: through the root's forward, whose hooks gather the weights
            return gather_positions(scores_at_every_position(base, b), b.positions).squeeze(-1).float() - offset
        h = trunk(base)(
            input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
        ).last_hidden_state  # (B, L, d)
        return base.score(gather_positions(h, b.positions)).squeeze(-1).float() - offset  # (B, R)

    def save(self, path: Path, merge: bool = False, state_dict: dict | None = None) -> None:
        """``state_dict``: the whole weights of a sharded critic, gathered (``common.full_state_dict``)."""
        if self.kind == "none":
            return
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "policy_head":
            from safetensors.torch import save_file

            weight = self.head.weight.detach() if state_dict is None else state_dict["weight"]
            save_file({"weight": weight.contiguous()}, str(path / "value_head.safetensors"))
        else:
            (unwrap(self.seq_model, merge=True) if merge else self.seq_model).save_pretrained(
                path, safe_serialization=True, state_dict=state_dict
            )

    def load(self, path: Path, on_shards: bool = False) -> None:
        from safetensors.torch import load_file

        if self.kind == "none":
            return
        if self.kind == "policy_head":
            weights = load_file(str(path / "value_head.safetensors"))
            if on_shards:  # FSDP2: this process keeps its shard
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.head, weights, options=StateDictOptions(full_state_dict=True))
            else:
                self.head.load_state_dict(weights)
            return
        load_weights(self.seq_model, path, on_shards=on_shards)


def scores_at_every_position(base: nn.Module, b: Batch) -> torch.Tensor:
    """(B, L, 1): a sequence classifier's scalar head at every position, from its own forward (which
    applies the head to every position, then keeps the last): caught on the way by a hook on the head."""
    caught: list[torch.Tensor] = []
    hook = base.score.register_forward_hook(lambda _module, _inputs, output: caught.append(output))
    try:
        base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    finally:
        hook.remove()
    return caught[0]


class _Checkpoint(nn.Module):
    """What ``save_checkpoint`` writes as ``model/``: the policy there, the critic in ``model/critic``."""

    def __init__(self, policy: nn.Module, critic: Critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def save_pretrained(self, path, state_dict: dict | None = None, **kw) -> None:
        """``state_dict``: FSDP2's gathered weights, named as the optimizer's modules (``policy.…``,
        ``critic.seq_model.…`` or ``critic.head.…``)."""

        def part(prefix: str) -> dict | None:
            if state_dict is None:
                return None
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        self.policy.save_pretrained(path, state_dict=part("policy."), **kw)
        critic = "critic.seq_model." if self.critic.kind == "rm" else "critic.head."
        self.critic.save(Path(path) / "critic", state_dict=part(critic))


# ---------------------------------------------------------------------------------------------
# forwards without grad, in chunks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout_forwards(
    policy,
    ref,
    critic: Critic,
    batch: Batch,
    temperature: float,
    chunk: int,
    autocast,
    lora_ref: bool,
    with_policy: bool = True,
) -> dict[str, torch.Tensor]:
    """Old log-probs, entropy, values and reference log-probs of the whole rollout batch.

    ``ref=None`` with ``lora_ref``: the reference is the policy with its adapters disabled.
    ``with_policy=False``: the reference's log-probs only (on-policy GRPO has the policy's from its
    training pass, ``recipes/critic_free.py``).
    """
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "values": [], "ref_logprobs": []}
    N, R = batch.response.shape

    def pad(x: torch.Tensor) -> torch.Tensor:  # (b, r) -> (b, R): chunks are trimmed to their own length
        return torch.nn.functional.pad(x, (0, R - x.shape[1]))

    chunks = length_chunks(batch, torch.arange(N, device=batch.response.device), chunk)
    for rows in chunks:
        b = batch.rows(rows)
        # one autocast context per model: its cache of bf16 weight casts is freed on exit
        if with_policy:
            with autocast():
                h, logits = policy_forward(policy, b)  # (b, r, d), (b, r, V)
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
                    ref_logits = policy_forward(policy, b)[1]
            else:
                ref_logits = policy_forward(ref, b)[1]
            out["ref_logprobs"].append(pad(logprobs_from_logits(ref_logits, b.response, temperature)))
            del ref_logits
    back = torch.argsort(torch.cat(chunks))  # rows back into batch order
    # critic 'none': no "values"
    return {k: torch.cat(v)[back] * batch.response_mask for k, v in out.items() if v}


def length_chunks(batch: Batch, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` sorted by sequence length, cut into chunks of ``size``: each chunk pads little.

    Each forward pads its rows to the chunk's longest sequence; in rollout order a batch of the
    demo's PPO (prompts of 44-102 tokens, answers of up to 128) holds ~40 % padding, sorted chunks
    of 4 rows ~10 %: the policy forward and a training forward + backward ~1.35x faster.
    Unlike ``data.tokenize.length_groups`` (SFT and RM: groups bounded by padding slack only) the
    chunks have a fixed row count: fewer rows per forward were faster here even unsorted, and the
    training micro-batches are a memory knob (``grad_accum``) whose count must not depend on lengths.
    """
    order = rows[torch.argsort(batch.last_index[rows], stable=True)]
    return list(order.split(max(1, size)))


@torch.no_grad()
def rm_scores(rm, batch: Batch, chunk: int, autocast) -> torch.Tensor:
    """Normalised reward-model scores (N,), read at each response's last token (its EOS)."""
    scores = []
    chunks = length_chunks(batch, torch.arange(len(batch.response), device=batch.response.device), chunk)
    for rows in chunks:
        b = batch.rows(rows)
        with autocast():
            scores.append(rm.score(b.input_ids, b.attention_mask, b.last_index).float())
    return torch.cat(scores)[torch.argsort(torch.cat(chunks))]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


@dataclass
class Models:
    """PPO's models (see ``recipes/ppo.py``'s docstring) and the generator that samples from the policy."""

    policy: nn.Module
    ref: nn.Module | None  # None with LoRA: the policy with its adapters disabled
    critic: Critic
    rm: RewardModel | None  # None with a reward_fn
    tok: Any
    generator: Generator  # rollout_backend's: the engine, transformers' generate or vLLM
    autocast: Callable[[], Any]  # the training precision's autocast context (or a null one)
    device: torch.device = torch.device("cpu")  # the policy's: every tensor PPO makes is made there
    whole: nn.Module | None = None  # FSDP2, DeepSpeed: the whole copy of the policy the generator samples from


def load_models(cfg: PPOConfig, device, precision: str, reward_fn: Callable | None, say=print, acc=None) -> Models:
    """Policy (+ LoRA), frozen reference, critic and reward model, each prepared by ``rlhfkit.accel``.
    Under FSDP2 (``acc``'s engine) policy and critic are sharded, and the generator gets a whole copy
    of the policy (``ppo_processes.gather_into`` refreshes it each iteration).

    The order is that of the global RNG's use (LoRA's and the heads' initialisation): keep it.
    """
    loaded = load_causal_lm(cfg.model)
    tok = loaded.tokenizer
    if not cfg.chat_template:
        tok.chat_template = None
    policy = loaded.model.to(device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy = apply_lora(policy, cfg)
    accel = prepare_for_training(policy, cfg, device, say, name="policy")
    ref = None
    if not cfg.lora:  # the frozen SFT model; with LoRA it is the policy with adapters disabled
        ref = load_causal_lm(cfg.model).model.to(device).requires_grad_(False).eval()
        prepare_for_inference(ref, cfg, device, like=accel, say=say, name="reference")
    critic = load_critic(cfg, policy, device, say)
    rm = None
    if reward_fn is None:
        bf16 = precision == "bf16"
        rm, rm_tok = load_reward_model(cfg.reward_model, dtype=torch.bfloat16 if bf16 else torch.float32)
        if rm_tok.get_vocab() != tok.get_vocab():
            raise UserError(f"reward_model={cfg.reward_model}: its tokenizer differs from the policy's ({cfg.model})")
        rm = rm.to(device).requires_grad_(False).eval()
        prepare_for_inference(rm.seq_model, cfg, device, like=accel, say=say, name="reward model")
    policy.train()
    critic.train()
    whole = None
    if acc is not None and engine(acc) in ("fsdp", "deepspeed"):  # DeepSpeed partitions them in setup_optimization
        whole = load_causal_lm(cfg.model).model.to(device).requires_grad_(False).eval()
        if engine(acc) == "fsdp":
            shard_trained(acc, policy, critic)
    generator = make_generator(policy if whole is None else whole, tok, cfg.rollout_backend, precision, say)
    if not generator.eos_ids:
        raise UserError(f"{cfg.model}: the tokenizer has no EOS token; responses could never end")
    autocast = autocast_of(device, precision)
    return Models(policy, ref, critic, rm, tok, generator, autocast, torch.device(device), whole)


def shard_trained(acc, policy: nn.Module, critic: Critic) -> None:
    """FSDP2 on the policy and the critic, as accelerate shards a model it prepares (``fsdp2_prepare_model``:
    the launch config's wrap policy, resharding and mixed precision), in place. FSDP2 averages their
    gradients over the processes; ``ppo_processes.take_step`` turns that back into the sum."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    for model in [policy] + ([critic.seq_model] if critic.kind == "rm" else []):
        fsdp2_prepare_model(acc, model)
    if critic.kind == "policy_head":  # the value head is its own FSDP2 unit: a DTensor like the policy's weights
        from torch.distributed.fsdp import fully_shard

        fully_shard(critic.head)


def load_critic(cfg: PPOConfig, policy: nn.Module, device, say=print) -> Critic:
    """A value head on the policy's trunk (critic='policy_head'), a copy of the reward model, or
    none (critic='none': RLOO, GRPO)."""
    if cfg.critic == "none":
        return Critic("none")
    if cfg.critic == "policy_head":
        head = nn.Linear(hidden_size(policy), 1, bias=False, device=device)
        # zero: the first advantages are plain Monte-Carlo returns. A random head gives values of
        # a few units, and GAE charges that bias to the last token — the EOS — so the policy
        # learns not to stop (seen on SmolLM2: the no-EOS share more than doubled in a few iterations).
        nn.init.zeros_(head.weight)
        return Critic("policy_head", head=head)
    seq_model = load_reward_model(cfg.critic_model or cfg.reward_model or cfg.model)[0].seq_model
    if cfg.gradient_checkpointing:
        seq_model.gradient_checkpointing_enable()
    seq_model = apply_lora(seq_model, cfg, task_type="SEQ_CLS").to(device)
    prepare_for_training(seq_model, cfg, device, say, name="critic")
    return Critic("rm", seq_model=seq_model)


def autocast_of(device, precision: str) -> Callable[[], Any]:
    """A factory of the training precision's autocast context: bf16 autocast, or none for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext
