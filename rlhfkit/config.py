"""One typed config per stage and per command. YAML files are only presets of them; ``key=value``
overrides win.

Every field carries its help text in ``metadata["help"]``; ``rlhfkit <command> --help`` lists them
all (the CLI is generated from these classes). Precedence: dataclass defaults < ``--config
preset.yaml`` < options < ``key=value`` overrides. Enum-like fields are ``Literal`` types, checked
when a config is built (``__post_init__``), with the allowed values in the error.

The pipeline nests the stage configs (``PipelineConfig.sft / .rm / .ppo``): one set of defaults per
stage, set as ``sft.lr=1e-4`` on the command line or as a mapping in YAML. The demo's choices are
the preset ``presets/demo.yaml``.

Fields shared by every training stage live in ``TrainConfig``; each stage adds its own. This is
the only inheritance in the project and it holds data, not behaviour.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfkit.errors import UserError


def opt(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:
    """A config field with its help text (a list default is copied per instance; a class default is
    a nested config, built fresh per instance). ``flag``: the CLI option's name where it is not
    ``--field-name`` (e.g. ``--model`` for a repeatable list ``models``)."""
    meta = {"help": help} | ({"flag": flag} if flag else {})
    if isinstance(default, type):  # a nested config: a fresh instance of its class
        return field(default_factory=default, metadata=meta, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


Precision = Literal["auto", "bf16", "fp32"]
Schedule = Literal["cosine", "linear", "constant"]
Switch = Literal["auto", "on", "off"]
Critic = Literal["rm", "policy_head"]
NoCritic = Literal["none"]  # RLOO, GRPO
ScoreBaseline = Literal["none", "group"]
DPOLossType = Literal["sigmoid", "ipo"]
PairWeighting = Literal["per_ranking", "per_pair"]
Labeler = Literal["simulated", "gold", "human", "mix"]
Optimizer = Literal["ppo", "a2c", "rloo", "grpo", "dpo", "ilql", "best_of_n", "none"]
ILQLRecords = Literal["rankings", "demonstrations"]
Backend = Literal["auto", "engine", "hf", "vllm"]
BACKEND_HELP = "auto (the engine where it supports the model, else transformers), engine, hf or vllm"


@dataclass
class TrainConfig:
    """Fields every training stage has."""

    model: str = opt(
        "smollm2-135m-instruct",
        "Model: 'smollm2-135m-instruct' (embedded), 'tiny-random', an HF directory, a hub id or a .gguf file.",
    )
    data: str = opt(
        "", "Training data: .jsonl/.json/.csv/.txt file, a local `datasets` directory or a hub dataset name."
    )
    eval_data: str = opt("", "Held-out data (same formats). Empty: hold out `eval_fraction` of `data`.")
    split: str = opt("train", "Split of `data` to read when it is a datasets directory or a hub dataset.")
    eval_split: str = opt("test", "Split of `eval_data` to read when it is a datasets directory or a hub dataset.")
    eval_fraction: float = opt(
        0.05, "Share of `data` held out for evaluation when `eval_data` is empty (seeded split)."
    )
    fields: dict = opt(
        {}, "Field mapping from our names to your columns, e.g. {prompt: instruction, response: output}."
    )
    skip_invalid: bool = opt(
        False, "Skip bad records (reported with counts and reasons) instead of stopping at the first one."
    )
    limit: int = opt(0, "Use at most this many training records (0 = all).")
    out: str = opt("runs/out", "Output directory: checkpoints, metrics.jsonl, the final model.")
    chat_template: bool = opt(
        True, "Format prompts with the tokenizer's chat template (false: plain text, for base models)."
    )
    max_length: int = opt(
        512, "Maximum tokens per example (prompt + response); longer examples are truncated (see README) and counted."
    )
    batch_size: int = opt(8, "Examples per optimizer step, across all processes and accumulation steps.")
    grad_accum: int = opt(
        1, "Micro-batches per optimizer step on each process (memory knob; the loss does not change)."
    )
    epochs: float = opt(1.0, "Passes over the training data (fractional allowed).")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).")
    max_seconds: float = opt(
        0.0,
        "Wall-clock budget of the stage in seconds from its start, loading included: training stops after the step "
        "during which it ran out and saves the model as usual (0 = no limit); for comparing optimisers on one budget.",
    )
    lr: float = opt(1e-5, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(0, "Linear warm-up steps from 0 to `lr`.")
    schedule: Schedule = opt("cosine", "Learning-rate decay after warm-up: cosine, linear or constant.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    precision: Precision = opt("auto", "auto (bf16 autocast where the hardware has it, else fp32), bf16 or fp32.")
    seed: int = opt(0, "Seed for data order, initialisation and sampling.")
    eval_every: int = opt(0, "Evaluate on held-out data every N steps (0 = only before and after training).")
    save_every: int = opt(0, "Write a resumable checkpoint every N steps (0 = only at the end).")
    log_every: int = opt(1, "Write a metrics line every N steps.")
    report_to: str = opt(
        "none",
        "Experiment trackers fed the metrics.jsonl numbers: none, tensorboard, wandb, mlflow, all (those installed), "
        "or a comma list; files under `out` (W&B: set WANDB_MODE=offline or log in).",
    )
    resume: bool = opt(False, "Continue from the latest checkpoint in `out` on exactly the same trajectory.")
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights; the final model is saved merged.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout (0 keeps log-probs deterministic).")
    lora_targets: list = opt(
        ["all-linear"],
        "Module names LoRA adapts (e.g. [q_proj, v_proj]); all-linear: every linear layer but the output layer "
        "(LLaMA: the 7 attention and MLP projections; GPT-2: c_attn, c_proj, c_fc).",
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% slower).")
    compile: Switch = opt(
        "auto",
        "torch.compile each transformer block for training: auto (bf16 full fine-tuning on a CPU with a C++ "
        "compiler), on (also on a GPU) or off.",
    )

    def __post_init__(self) -> None:
        check_literals(self)
        if self.max_seconds < 0:
            raise UserError(f"max_seconds={self.max_seconds}: expected >= 0 (0 = no time limit)")


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: next-token loss on a raw text corpus (chunks of `max_length` tokens)."""

    data: str = opt("", "Text corpus: .txt file, or records with a `text` field.")
    lr: float = opt(3e-4, "Peak learning rate (AdamW).")
    max_length: int = opt(256, "Tokens per training chunk (the corpus is tokenised and cut into chunks).")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations, loss on response tokens only."""

    packing: bool = opt(
        False, "Pack several examples into each `max_length` row (attention stays within each example)."
    )
    lr: float = opt(2e-5, "Peak learning rate (AdamW).")
    warmup_steps: int = opt(5, "Linear warm-up steps from 0 to `lr`.")


@dataclass
class RewardConfig(TrainConfig):
    """A scalar reward model from K-way rankings (InstructGPT's loss)."""

    batch_size: int = opt(8, "Prompts per optimizer step (each brings all K of its responses).")
    lr: float = opt(1e-5, "Peak learning rate (AdamW).")
    warmup_steps: int = opt(5, "Linear warm-up steps from 0 to `lr`.")
    normalize: bool = opt(
        True, "After training, set the offset so the mean score of the reference (best) answers is 0."
    )
    share_prompt: bool = opt(
        True,
        "Put the K responses of a prompt in one row after a single copy of the prompt (same scores, fewer tokens; "
        "used when it saves >= 10% of them).",
    )


@dataclass
class DPOConfig(TrainConfig):
    """Direct Preference Optimization (Rafailov et al. 2023): the policy learns from the rankings directly, with
    the frozen SFT model as the reference and no reward model or sampling."""

    model: str = opt(
        "smollm2-135m-instruct", "The SFT model: the policy starts from it and the frozen reference is it."
    )
    data: str = opt("", "Rankings or pairs (the formats of `rlhfkit rm`); a ranking of K gives its untied pairs.")
    batch_size: int = opt(8, "(chosen, rejected) pairs per optimizer step, across all processes and accumulation.")
    lr: float = opt(1e-6, "Peak learning rate (AdamW); DPO wants a small one (TRL: 1e-6).")
    warmup_steps: int = opt(5, "Linear warm-up steps from 0 to `lr`.")
    beta: float = opt(0.1, "beta: strength of the implicit KL to the reference (larger = stay closer).")
    loss_type: DPOLossType = opt(
        "sigmoid", "sigmoid (DPO, eq. 7; with label_smoothing: conservative DPO) or ipo (Azar et al. 2023, eq. 17)."
    )
    label_smoothing: float = opt(
        0.0, "Conservative DPO: the share eps of labels assumed flipped (0 = plain DPO; sigmoid loss only)."
    )
    pair_weighting: PairWeighting = opt(
        "per_ranking",
        "per_ranking: each ranking's pairs weigh 1/(its pair count), so every prompt counts once (InstructGPT's RM); "
        "per_pair: every pair counts once. The same for plain pairs.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise UserError(f"beta={self.beta}: expected > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"label_smoothing={self.label_smoothing}: expected 0 <= eps < 0.5")


@dataclass
class ILQLConfig(TrainConfig):
    """Implicit Language Q-Learning (Snell et al. 2022): offline RL on logged answers and their rewards, with
    token-level Q (twin heads + Polyak targets) and V heads on the LM trunk; no sampling during training. The
    saved model generates with log pi + beta (Q - V)."""

    model: str = opt("smollm2-135m-instruct", "The SFT model: the LM (behaviour policy) and the trunk of the heads.")
    data: str = opt(
        "",
        "Logged answers: rankings or pairs (the formats of `rlhfkit rm`, HH pairs included) or demonstrations "
        "(records=demonstrations). Each answer is one episode, its reward on its last token.",
    )
    records: ILQLRecords = opt(
        "rankings",
        "rankings: reward linear in the rank, +1 best to -1 worst (a pair: chosen +1, rejected -1; all tied: 0), "
        "or the reward model's scores when reward_model is set; demonstrations: every answer gets demo_reward.",
    )
    reward_model: str = opt(
        "", "Score the rankings' answers with this reward model (`rlhfkit rm` directory) instead of their ranks."
    )
    demo_reward: float = opt(1.0, "records=demonstrations: the reward of every answer.")
    batch_size: int = opt(8, "Answers (episodes) per optimizer step, across all processes and accumulation.")
    lr: float = opt(1e-5, "Peak learning rate of the LM (AdamW).")
    head_lr: float = opt(
        1e-4,
        "Learning rate of the Q and V heads (0 = lr). On SmolLM2-135M 1e-3 made the Q loss jump from 0.15 to 28 "
        "at step 2 (Adam moves every weight of the zero-initialised layer by ~lr, amplified through the 49k-token "
        "embedding); 1e-4 kept it below 0.4.",
    )
    warmup_steps: int = opt(5, "Linear warm-up steps from 0 to `lr`.")
    gamma: float = opt(0.99, "Discount per token of the Q target r + gamma V(s') (Snell et al.; TRLX: 0.99).")
    tau: float = opt(
        0.7, "Expectile of the V loss (0.5 = mean of Q, towards 1 = max over the data's tokens; TRLX: 0.7)."
    )
    cql_scale: float = opt(
        0.1, "Weight of the CQL term, cross-entropy of softmax(Q) against the logged token (TRLX: 0.1)."
    )
    awac_scale: float = opt(1.0, "Weight of the LM's NLL term on the logged tokens (TRLX: 1).")
    awac_beta: float = opt(
        0.0, "AWAC: weight each token's NLL by exp(awac_beta (Q - V)); 0 = plain NLL, the LM models the data (TRLX: 0)."
    )
    polyak_alpha: float = opt(
        0.005,
        "Target Q heads move alpha of the way to the online heads after every step (IQL and SAC: 0.005); raise it "
        "for runs of a few dozen steps.",
    )
    beta: float = opt(
        1.0, "beta of generation, logits log pi + beta (Q - V), saved in ilql.json (edit it there) and used in eval."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("gamma", 0 < self.gamma <= 1, "expected 0 < gamma <= 1"),
            ("tau", 0 < self.tau < 1, "expected 0 < tau < 1"),
            ("polyak_alpha", 0 < self.polyak_alpha <= 1, "expected 0 < alpha <= 1"),
            ("beta", self.beta >= 0, "expected >= 0"),
            ("cql_scale", self.cql_scale >= 0, "expected >= 0"),
            ("awac_scale", self.awac_scale >= 0, "expected >= 0"),
            ("head_lr", self.head_lr >= 0, "expected >= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)}: {want}")
        if self.reward_model and self.records != "rankings":
            raise UserError("reward_model scores rankings: set records=rankings or leave reward_model empty")


@dataclass
class PPOConfig(TrainConfig):
    """PPO against a reward model with a per-token KL penalty to the SFT model (InstructGPT step 3)."""

    model: str = opt(
        "smollm2-135m-instruct", "The SFT model: the policy starts from it and the frozen reference is it."
    )
    data: str = opt("", "Prompts (any prompt format of the loaders). Empty: the built-in task's train split.")
    reward_model: str = opt(
        "", "Reward model directory (saved by `rlhfkit rm`). Empty only when a reward_fn is passed from Python."
    )
    critic: Critic = opt(
        "rm",
        "Critic: 'rm' (a copy of the reward model, its head applied per token) or 'policy_head' (a value head on the "
        "policy trunk).",
    )
    critic_model: str = opt(
        "",
        "Initialise the critic from this model instead of `reward_model` (empty: reward_model, else the SFT model "
        "with a fresh head).",
    )
    batch_size: int = opt(16, "Prompts per PPO iteration (rollout batch = batch_size x samples_per_prompt).")
    samples_per_prompt: int = opt(1, "Responses sampled per prompt in each iteration (they share one prefill).")
    max_steps: int = opt(0, "PPO iterations (0 = from epochs over the prompts).")
    max_new_tokens: int = opt(
        64, "Longest response in tokens; one that reaches it without EOS gets missing_eos_penalty."
    )
    max_prompt_length: int = opt(256, "Prompts longer than this keep their last tokens (counted and reported).")
    temperature: float = opt(0.7, "Sampling temperature; log-probs are always recomputed from logits / temperature.")
    rollout_backend: Backend = opt("auto", "Generator of the rollouts: " + BACKEND_HELP + ".")
    ignore_eos: bool = opt(
        False,
        "Always generate max_new_tokens (benchmarks, TRL's default); responses are still cut after the first EOS.",
    )
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    num_minibatches: int = opt(2, "Optimizer steps per pass over a rollout batch.")
    lr: float = opt(3e-6, "Learning rate of policy and critic (one AdamW, one gradient-norm clip).")
    schedule: Schedule = opt("constant", "Learning-rate decay after warm-up: cosine, linear or constant.")
    kl_coef: float = opt(
        0.05, "beta of the per-token KL penalty -beta (log pi - log pi_ref); the initial value when adaptive_kl."
    )
    adaptive_kl: bool = opt(False, "Adapt beta towards target_kl (Ziegler et al. 2019).")
    target_kl: float = opt(6.0, "Target KL per response (nats) for adaptive_kl.")
    kl_horizon: int = opt(10000, "Horizon (episodes) of the adaptive KL controller.")
    gamma: float = opt(1.0, "GAE discount.")
    lam: float = opt(0.95, "GAE lambda.")
    cliprange: float = opt(0.2, "PPO ratio clip epsilon.")
    cliprange_value: float = opt(0.2, "Value clip epsilon (in reward units).")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    value_head_lr: float = opt(
        1e-3,
        "critic='policy_head': learning rate of the value head (0 = lr). The head starts at zero and must learn the "
        "value scale within a few iterations; at the trunk's lr it barely moves.",
    )
    whiten_advantages: bool = opt(True, "Whiten advantages over the rollout batch.")
    whiten_rewards: bool = opt(False, "Scale per-token rewards to unit variance (mean kept).")
    score_clip: float = opt(0.0, "Clip reward-model scores to [-c, c] (0 = off).")
    score_baseline: ScoreBaseline = opt(
        "none",
        "'group': subtract from each score the mean of the other samples of its prompt (leave-one-out, RLOO; needs "
        "samples_per_prompt >= 2): the RM's per-prompt offset is noise to PPO. 'none': InstructGPT's plain score.",
    )
    missing_eos_penalty: float | None = opt(
        -1.0, "Score given to a response that never produced EOS (null = keep its score)."
    )
    ptx_data: str = opt("", "PPO-ptx: a text corpus whose next-token loss is mixed into every minibatch (empty = off).")
    ptx_coef: float = opt(0.0, "PPO-ptx: weight gamma of the pretraining loss.")
    ptx_batch_size: int = opt(4, "PPO-ptx: corpus chunks per minibatch.")
    ptx_length: int = opt(256, "PPO-ptx: tokens per corpus chunk.")
    grad_accum: int = opt(
        2,
        "Micro-batches per minibatch, each of rows of similar length (less padding, less memory; the loss does not "
        "change). 1 suits a GPU.",
    )
    forward_batch_size: int = opt(
        4,
        "Sequences per no-grad forward (log-probs, reference, values, scores), rows sorted by length so each chunk "
        "pads little; larger suits a GPU.",
    )
    save_every: int = opt(0, "Write a resumable checkpoint every N iterations (0 = only at the end).")


@dataclass
class A2CConfig(PPOConfig):
    """A2C (Mnih et al. 2016, synchronous): PPO's rollouts, rewards, KL penalty, GAE and critic, and one
    gradient step of the plain policy gradient -A log pi + the unclipped value loss per rollout batch. The
    step is taken where the rollout was sampled, so there is no ratio to clip: PPO's epochs, minibatches
    and clip ranges do not apply (PPO with one epoch and one minibatch takes this step; Huang et al. 2022)."""

    ppo_epochs: int = opt(1, "A2C: 1 (one gradient step per rollout batch); more passes are PPO's.")
    num_minibatches: int = opt(
        1, "A2C: 1 (the step is on the whole rollout batch; grad_accum splits it for memory); more are PPO's."
    )
    cliprange: float | None = opt(None, "A2C: none (the policy ratio is 1 at its one step: nothing to clip).")
    cliprange_value: float | None = opt(None, "A2C: none (the value loss is the plain 1/2 (V - R)^2).")
    entropy_coef: float = opt(
        0.0,
        "Weight c of the entropy bonus -c H(pi) in the policy loss (Mnih et al.: 0.01; the KL penalty "
        "already keeps the policy near the SFT model).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ppo = "PPO's (`rlhfkit ppo`)"
        if self.ppo_epochs != 1:
            raise UserError(
                f"ppo_epochs={self.ppo_epochs}: A2C takes one gradient step per rollout batch; several passes are {ppo}"
            )
        if self.num_minibatches != 1:
            raise UserError(
                f"num_minibatches={self.num_minibatches}: A2C takes its one step on the whole rollout batch "
                f"(grad_accum splits it for memory); minibatches are {ppo}"
            )
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) is not None:
                raise UserError(
                    f"{name}={getattr(self, name)}: A2C has no ratio to clip (its one step per rollout batch is at "
                    f"ratio 1); clipping is {ppo}"
                )
        if self.entropy_coef < 0:
            raise UserError(f"entropy_coef={self.entropy_coef}: expected >= 0")


@dataclass
class RLOOConfig(PPOConfig):
    """RLOO (Ahmadian et al. 2024): k samples per prompt, each one's reward (score − β·KL) minus the
    mean of the other k−1 is its advantage; PPO's clipped ratio, no critic (the GAE/value fields are unused)."""

    critic: NoCritic = opt("none", "No critic: the baseline is the other samples of the prompt.")
    samples_per_prompt: int = opt(4, "k: responses sampled per prompt (>= 2), the group of the baseline.")
    lr: float = opt(1e-6, "Learning rate of the policy (AdamW).")
    kl_coef: float = opt(0.05, "beta: the sequence reward is score − beta · Σ_t (log pi − log pi_ref).")
    whiten_advantages: bool = opt(False, "RLOO: whiten the advantages over the batch (GRPO: unused).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples_per_prompt < 2:
            raise UserError(
                f"samples_per_prompt={self.samples_per_prompt}: critic-free training compares the samples of a "
                "prompt, expected >= 2"
            )


@dataclass
class GRPOConfig(RLOOConfig):
    """GRPO (Shao et al. 2024): advantages (score − group mean) / (group std + eps); clipped ratio and
    beta · k3 KL to the reference in the loss, averaged per sequence then over the group."""

    kl_coef: float = opt(0.04, "beta of the k3 KL term in the loss (DeepSeekMath: 0.04).")


@dataclass
class PipelineConfig:
    """The RLHF loop on the built-in task: sample -> label -> SFT (best-of-K) -> reward model -> PPO -> judge.

    The stages' settings are nested: ``sft.lr=1e-4``, ``rm.epochs=2``, ``ppo.kl_coef=0.02``. The
    pipeline itself sets each stage's model, data, out, seed, precision, save_every, report_to and
    resume (and PPO's reward_model and rollout_backend); ``make demo`` runs it with the preset ``demo``.
    """

    model: str = opt("smollm2-135m-instruct", "Base model (any --model spec).")
    out: str = opt("runs/demo", "Run directory: every round's samples, rankings, models and metrics stay here.")
    train_prompts: int = opt(96, "Train prompts of the built-in task to sample and label (seeded subset).")
    eval_prompts: int = opt(0, "Held-out prompts for judging versions (0 = all 108).")
    k: int = opt(
        6, "Answers sampled per prompt for the labeler to rank (K = 2..9); a ranking of K gives K(K-1)/2 pairs."
    )
    max_new_tokens: int = opt(128, "Longest answer sampled for ranking and judging, in tokens.")
    temperature: float = opt(1.0, "Sampling temperature of the K answers to rank.")
    rollout_backend: Backend = opt("auto", "Generator of the sampling, judging and PPO rollouts: " + BACKEND_HELP + ".")
    labeler: Labeler = opt(
        "simulated",
        "Who ranks: simulated (gold rubric + human-like noise), gold (no noise), "
        "human (people in `rlhfkit serve`), or mix (people, the simulated labeler "
        "for the rest).",
    )
    db: str = opt(
        "",
        "labeler=human/mix: preference-store URL (empty: SQLite feedback.db in `out`, which "
        "`rlhfkit serve --run OUT` uses).",
    )
    human_rankings: int = opt(
        0, "labeler=human/mix: tasks of a round that people must rank before training goes on (0 = all)."
    )
    human_timeout: float = opt(
        86400.0, "labeler=human/mix: seconds to wait for them; then stop (rerun the same command to keep waiting)."
    )
    human_poll: float = opt(5.0, "labeler=human/mix: seconds between checks of the store.")
    labeler_temperature: float = opt(0.1, "Simulated labeler: Plackett-Luce noise temperature (0 = exact gold order).")
    labeler_length_bias: float = opt(0.0, "Simulated labeler: taste for longer (> 0) or shorter (< 0) answers.")
    labeler_random_share: float = opt(0.05, "Simulated labeler: share of careless, uniformly random rankings.")
    revise_demos: bool = opt(
        True,
        "Edit each demonstration by rule where that satisfies an instruction it missed (rlhfkit/feedback/revise.py).",
    )
    rank_revisions: bool = opt(
        True,
        "The simulated or gold labeler also ranks rule-revised versions of the sampled "
        "answers, so the RM sees one answer with and without a missed instruction met.",
    )
    rank_edit_sets: bool = opt(
        True,
        "The simulated or gold labeler also ranks, per prompt, one sampled answer beside "
        "rule edits of it that each fix one missed instruction.",
    )
    min_demo_score: float = opt(
        0.0, "A prompt's best answer becomes a demonstration only if its gold score is above this."
    )
    rounds: int = opt(
        1, "Rounds of iterated online RLHF: each samples from the newest policy, ranks, retrains the RM, runs PPO."
    )
    round_prompts: int = opt(
        64,
        "Fresh train prompts whose K answers from the newest policy are ranked in each "
        "round after the first (and in round 1 with rank_sft).",
    )
    rank_sft: bool = opt(
        True,
        "Round 1 also ranks K answers of the SFT model to round_prompts fresh prompts, so the "
        "RM learns from SFT samples too (as InstructGPT).",
    )
    optimizer: Optimizer = opt(
        "ppo",
        "The policy optimiser of every round, from the SFT model: ppo, a2c, rloo or grpo (against the round's reward "
        "model), dpo or ilql (offline, on all rankings so far), best_of_n (no training: the round's reward model picks "
        "the best of best_of_n SFT samples) or none (SFT and reward models only).",
    )
    best_of_n: int = opt(
        8,
        "optimizer=best_of_n: N, the SFT samples (at `temperature`) per held-out prompt of which the round's reward "
        "model picks one. KL to SFT <= log N - (N-1)/N: 1.20 nats at 8 (4: 0.64, 16: 1.94), inside the demo PPO's "
        "1-3 nats, for 8x the sampling of one greedy answer.",
    )
    precision: Precision = opt("auto", "Precision of every stage: auto (bf16 where the hardware has it), bf16 or fp32.")
    seed: int = opt(0, "Seed for prompt choice, sampling, labeler noise and every stage (PPO of round r: seed + r).")
    save_every: int = opt(
        10,
        "Every stage writes a resumable checkpoint every N steps (0 = only at the end); a "
        "killed pipeline, run again, continues each stage from its last one.",
    )
    report_to: str = opt(
        "none", "Experiment trackers of every stage: none, tensorboard, wandb, mlflow, all, or a comma list."
    )
    fresh_process: bool = opt(
        True,
        "Run each training stage in a child process of its own (the same results): in "
        "one process the earlier stages' leftover memory slows the later ones.",
    )
    eval_suites: str = opt(
        "",
        "Also run these `rlhfkit eval` suites on every version, SFT as the baseline (comma "
        "list of truthful, harmless, tax, helpful; empty = none).",
    )
    eval_data_dir: str = opt(
        "",
        "Local copies of the eval_suites data sets, laid out as `rlhfkit eval --help` "
        "lists under --data-dir. Empty = their Hugging Face hub datasets.",
    )
    eval_limit: int = opt(100, "Cap on the items of each eval suite (0 = whole data sets; hours on a CPU).")
    sft: SFTConfig = opt(SFTConfig, "SFT on the demonstrations (the labeler's best answer of each prompt).")
    rm: RewardConfig = opt(RewardConfig, "The reward model of each round, from all rankings so far.")
    ppo: PPOConfig = opt(PPOConfig, "PPO of each round, from the SFT model against that round's reward model.")
    a2c: A2CConfig = opt(A2CConfig, "A2C of each round (optimizer=a2c), from the SFT model against its RM.")
    dpo: DPOConfig = opt(DPOConfig, "DPO of each round (optimizer=dpo), from the SFT model on all rankings so far.")
    rloo: RLOOConfig = opt(RLOOConfig, "RLOO of each round (optimizer=rloo), from the SFT model against its RM.")
    grpo: GRPOConfig = opt(GRPOConfig, "GRPO of each round (optimizer=grpo), from the SFT model against its RM.")
    ilql: ILQLConfig = opt(
        ILQLConfig, "ILQL of each round (optimizer=ilql), from the SFT model on all rankings so far."
    )

    def __post_init__(self) -> None:
        for name, cls in STAGE_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, dict):  # e.g. read back from a run's pipeline.json
                value = config_from_dict(cls, value, f"{name}.")
                setattr(self, name, value)
            for key in PIPELINE_SETS + (("reward_model", "rollout_backend") if name in RL_STAGES else ()):
                if getattr(value, key) != getattr(cls(), key):
                    raise UserError(
                        f"{name}.{key}: the pipeline sets each stage's {key} itself; "
                        f"remove {name}.{key}=... (see `rlhfkit pipeline --help`)"
                    )
        check_literals(self)


@dataclass
class ServeConfig:
    """The web app: labeling queue, arena and leaderboard, chat, admin dashboard, OpenAI-compatible API."""

    run: str = opt("runs/demo", "Run directory: its model versions are served and feedback.db (SQLite) lives there.")
    db: str = opt("", "Database URL (e.g. postgresql://user@host/db). Empty: sqlite in the run directory (WAL).")
    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(8000, "Port to listen on.")
    models: list = opt(
        [],
        "Extra model versions as name=spec (any --model spec), besides those found in the run "
        "(repeatable: --model a=DIR --model b=DIR).",
        flag="--model",
    )
    precision: Precision = opt("auto", "auto (bf16 where the hardware has it), bf16 or fp32.")
    max_new_tokens: int = opt(256, "Longest answer in chat, the arena and the API (tokens); requests may ask for less.")
    rollout_backend: Backend = opt(
        "auto", "Generator of chat, the arena, the API and labeling batches: " + BACKEND_HELP + "."
    )
    best_of: int = opt(
        1,
        "Best-of-N: chat, arena and API answers are --reward-model's best of N samples (the N are "
        "generated first, then the picked answer streams as one chunk); also the cap of the "
        "completions API's best_of.",
    )
    reward_model: str = opt("", "Reward-model directory (saved by `rlhfkit rm`) that picks the best of N.")
    rate_limit: float = opt(30.0, "Chat, arena and API requests per minute per user (0 = no limit).")
    max_body_kb: int = opt(256, "Largest request body (KiB); larger requests get 413.")
    public_url: str = opt(
        "",
        "Base URL for invite links (empty: http://host:port). An https URL also makes the "
        "cookies Secure with __Host- names and turns on HSTS.",
    )
    login_failures: int = opt(
        5,
        "Failed sign-ins for one name within login_window_s; further attempts are refused "
        "(429, Retry-After) until the oldest leave the window (0 = no limit).",
    )
    login_failures_per_address: int = opt(
        20, "Failed sign-ins from one client address within login_window_s (0 = no limit)."
    )
    login_window_s: float = opt(300.0, "The sign-in throttling window (seconds).")

    def __post_init__(self) -> None:
        check_literals(self)


STAGES: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rm": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "a2c": A2CConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "ilql": ILQLConfig,
}
STAGE_FIELDS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RewardConfig,
    "ppo": PPOConfig,
    "a2c": A2CConfig,
    "dpo": DPOConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "ilql": ILQLConfig,
}  # PipelineConfig's nesting
RL_STAGES = ("ppo", "a2c", "rloo", "grpo")  # the pipeline's optimisers that sample against its reward model
PIPELINE_SETS = ("model", "data", "out", "resume", "seed", "precision", "save_every", "report_to")


# ---------------------------------------------------------------- building configs


class _Loader(yaml.SafeLoader):
    """YAML with true/false as the only booleans: ``compile: off`` stays the string 'off'."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in rules if tag != "tag:yaml.org,2002:bool"]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(hint: Any) -> tuple | None:
    """The allowed values of a ``Literal`` field (also inside ``Optional``), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def check_literals(cfg: Any) -> None:
    """Every ``Literal`` field of ``cfg`` holds one of its allowed values (called by ``__post_init__``)."""
    for name, hint in _hints(type(cfg)).items():
        allowed = choices(hint)
        value = getattr(cfg, name)
        if allowed is not None and value not in allowed and not (value is None and type(None) in typing.get_args(hint)):
            raise UserError(f"{name}={value!r}: expected one of {', '.join(map(str, allowed))}")


def field_help(cls: type) -> list[tuple[str, str, str]]:
    """(name, default as text, help) for every field except nested configs: what ``--help`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, repr(default) if default != "" else "''", f.metadata.get("help", "")))
    return rows


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    want = _hints(cls)[name]
    allowed = choices(want)
    if allowed is not None:
        if value is None and type(None) in typing.get_args(want):
            return None
        if value not in allowed:
            raise UserError(f"{where}: {name} expects one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    origin = typing.get_origin(want)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(want) if a is not type(None)]
        if value is None:
            return None
        want = args[0]
        origin = typing.get_origin(want)
    kind = origin or want
    if kind in (int, float) and isinstance(value, str):  # YAML 1.1 reads '1e-5' as a string
        try:
            value = kind(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[kind]
    if not ok(value):
        raise UserError(f"{where}: {name} expects {kind.__name__}, got {value!r}")
    if kind is float:
        return float(value)
    if kind is str:
        return str(value)
    return value


def _owner(cls: type, dotted: str, where: str) -> tuple[type, str]:
    """The config class that holds setting ``dotted`` (``lr`` or ``sft.lr``), and its last name."""
    *groups, name = dotted.split(".")
    for group in groups:
        _check_name(cls, group, where)
        sub = _hints(cls)[group]
        if not dataclasses.is_dataclass(sub):
            raise UserError(f"{where}: '{group}' is a single setting, not a group of them")
        cls = sub
    _check_name(cls, name, where)
    if dataclasses.is_dataclass(_hints(cls)[name]):
        raise UserError(
            f"{where}: '{dotted}' is a group of settings: set {dotted}.<name>=value "
            f"(`rlhfkit {dotted.split('.')[-1]} --help` lists them)"
        )
    return cls, name


def _check_name(cls: type, name: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{where}: unknown setting '{name}'{hint}; `--help` lists them all")


def _put(values: dict, dotted: str, value: Any) -> None:
    *groups, name = dotted.split(".")
    for group in groups:
        values = values.setdefault(group, {})
    values[name] = value


def _flatten(cls: type, mapping: dict, where: str, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of a YAML mapping; a nested config's mapping becomes ``group.name`` keys."""
    items = []
    for k, v in mapping.items():
        _check_name(cls, str(k), where)
        sub = _hints(cls)[k]
        if dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise UserError(f"{where}: {prefix}{k} is a group of settings: expected a mapping of name: value")
            items += _flatten(sub, v, where, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _read_preset(preset: str, seen: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A preset's settings as a mapping; ``extends: other`` starts from another preset's."""
    path = Path(preset)
    if not path.exists():
        bundled = Path(__file__).parent / "presets" / f"{preset}.yaml"
        path = bundled if bundled.exists() else path
    if not path.exists():
        raise UserError(f"--config {preset}: no such file (nor a bundled preset of that name)")
    try:
        loaded = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of setting: value")
    base = loaded.pop("extends", None)
    if base is None:
        return path, loaded
    if str(base) in seen:
        raise UserError(f"{path}: 'extends: {base}' goes round in a circle")
    _, merged = _read_preset(str(base), seen + (preset,))
    for k, v in loaded.items():  # one level of groups: `sft: {lr: ...}` adds to the base's `sft:`
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return path, merged


def config_from_dict(cls: type, values: dict, where: str = "") -> Any:
    """Build ``cls`` from a (possibly nested) mapping of settings, checking names and types."""
    kwargs = {}
    for name, value in values.items():
        _check_name(cls, name, where or cls.__name__)
        sub = _hints(cls)[name]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = config_from_dict(sub, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(cls, name, value, f"{where}{name}")
    return cls(**kwargs)


def build_config(cls: type, preset: str | None = None, overrides: list[str] = (), **cli: Any):
    """Defaults < YAML preset < explicit CLI options (``cli``, None = not given) < ``key=value``.

    Overrides and preset keys may name a nested config's setting: ``sft.lr=1e-4``."""
    values: dict[str, Any] = {}
    if preset:
        path, loaded = _read_preset(preset)
        for k, v in _flatten(cls, loaded, str(path)):
            owner, name = _owner(cls, k, str(path))
            _put(values, k, _coerce(owner, name, v, str(path)))
    for k, v in cli.items():
        if v is not None:
            values[k] = _coerce(cls, k, v, f"--{k.replace('_', '-')}")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"'{item}': overrides are key=value (for example lr=1e-5)")
        k, raw = item.split("=", 1)
        k = k.strip().replace("-", "_")
        owner, name = _owner(cls, k, f"override '{item}'")
        try:
            v = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
        except yaml.YAMLError:
            v = raw
        hint = _hints(owner)[name]
        if not isinstance(v, str) and (hint is str or (choices(hint) and v is not None)):
            v = raw  # a string setting keeps the text as typed ('1e-5', 'true')
        _put(values, k, _coerce(owner, name, v, f"override '{item}'"))
    return config_from_dict(cls, values)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
