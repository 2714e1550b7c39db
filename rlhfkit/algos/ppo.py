"""PPO math for RLHF: masked statistics, KL estimators, per-token rewards, GAE, the clipped losses
and the KL controllers (the log-probs: ``algos/logprobs.py``). Pure functions on tensors; the loop
lives in recipes/ppo.py.

Sources, cited where each piece is used:
- [InstructGPT] Ouyang et al. 2022, "Training language models to follow instructions with human
  feedback", eq. 2 (per-token KL penalty to the SFT model, RM score at the end).
- [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2
  (adaptive KL coefficient); code: openai/lm-human-preferences `lm_human_preferences/train_policy.py`.
- [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clipped objective).
- [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", eq. 16.
- [N-details] Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (and
  vwxyzjn/summarize_from_feedback_details `ppo.py`): unbiased whitening, EOS truncation and the
  no-EOS penalty, temperature-scaled log-probs, value clipping.
- [A3C] Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", Algorithm S3
  (the unclipped value loss A2C uses; its policy loss is ``rlhfkit/algos/a2c.py``).
- [KL-approx] http://joschu.net/blog/kl-approx.html (k1, k2, k3 estimators).
- [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", §3.2 (leave-one-out baseline over k samples of a prompt);
  Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".

Conventions. B = batch (sequences), T = response length (right-padded), V = vocabulary.
`response_mask` is 1 on real response tokens (including the EOS token that ended the response)
and 0 on padding after it; it must be a prefix of ones in every row. Masks may be bool or float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "truncate_after_eos",
    "apply_missing_eos_penalty",
    "clip_scores",
    "group_baseline",
    "whiten_rewards",
    "compute_rewards",
    "compute_gae",
    "PolicyLossOutput",
    "ppo_policy_loss",
    "ValueLossOutput",
    "ppo_value_loss",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
]


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1.

    mean = Σ values·mask / Σ mask  (over all elements, or along ``dim``).

    Args:
        values: any shape, e.g. ``(B, T)``.
        mask: same shape, bool or 0/1.
        dim: reduce along this dimension only; ``None`` reduces over everything.

    Returns:
        A scalar, or ``values`` reduced along ``dim``. An all-zero mask gives NaN (0/0), which
        the metrics log then shows instead of a silent 0.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked positions (a scalar).

    var = Σ (x − mean)²·mask / Σ mask, times the Bessel correction n / (n − 1) when ``unbiased``
    (n = Σ mask), as in [N-details] and TRL's ``masked_var``.

    Args:
        values: ``(B, T)`` (any shape).
        mask: same shape, bool or 0/1.
        unbiased: apply Bessel's correction.

    Raises:
        ValueError: when the mask selects no element, or only one with ``unbiased`` (n − 1 = 0).
    """
    mean = masked_mean(values, mask)
    centered = values - mean
    variance = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        n_int = int(n.item())
        if n_int == 0:
            raise ValueError("masked_var: the mask selects no element")
        if n_int == 1:
            raise ValueError("masked_var: the mask selects one element; the unbiased variance needs two")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``values`` with the mean and (unbiased) variance of the masked positions.

    whitened = (x − mean) / sqrt(var + eps); with ``shift_mean=False`` the mean is added back,
    so only the scale changes (used for rewards, whose sign carries meaning) [N-details].

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)``, bool or 0/1.
        shift_mean: centre the result at 0 (advantages) or keep the original mean (rewards).
        eps: added to the variance.

    Returns:
        ``(B, T)``; positions outside the mask are set to 0 so padding never carries a value.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------------------------
# KL estimators  http://joschu.net/blog/kl-approx.html
# Samples come from the first distribution q; r = p(x)/q(x); each estimator's mean → KL[q, p].
# ---------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(x) − log π_ref(x) per token: unbiased for KL[π‖π_ref], high variance, can be < 0.

    This is the per-token penalty of [InstructGPT] eq. 2. Shapes: ``(B, T)`` → ``(B, T)``.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(x) − log π_ref(x))²: biased, low variance, ≥ 0 [KL-approx].

    PPO's ``approx_kl`` is the mean of k2 between the rollout and the current policy [N-details].
    Shapes: ``(B, T)`` → ``(B, T)``.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref(x)/π(x) = exp(ref_logprobs − logprobs) [KL-approx].

    Unbiased for KL[π‖π_ref] (E_π[r] = 1), low variance, always ≥ 0.
    Shapes: ``(B, T)`` → ``(B, T)``.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


# ---------------------------------------------------------------------------------------------
# EOS handling, scores and per-token rewards
# ---------------------------------------------------------------------------------------------


def _check_prefix_mask(mask: torch.Tensor) -> None:
    m = mask.to(torch.int8)
    if (m[:, 1:] > m[:, :-1]).any():
        raise ValueError(
            "response_mask must be a prefix of ones in every row (right-padded responses, "
            "1 up to and including EOS, 0 after)"
        )


def truncate_after_eos(
    response: torch.Tensor, eos_token_id: int | Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every response at its first EOS: tokens after it become padding.

    Generation may run past EOS (batched sampling stops when *all* rows end, or at max length),
    so the tokens after the first EOS are garbage the policy must not be trained on
    [N-details, "EOS trick"]. The EOS token itself stays in the mask: stopping is an action the
    policy took and the reward lands on it.

    Args:
        response: ``(B, T)`` sampled token ids (without the query).
        eos_token_id: one id, or several (chat models often stop at ``<|im_end|>`` or ``<|endoftext|>``).
        pad_token_id: id written after the first EOS.

    Returns:
        ``(response, response_mask, ended)``: the truncated response ``(B, T)``, the mask
        ``(B, T)`` (bool, 1 up to and including the first EOS; all ones when there is none) and
        ``ended`` ``(B,)`` (bool, whether the response contains an EOS at all).
    """
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=response.device
    )
    is_eos = torch.isin(response, eos)  # (B, T)
    ended = is_eos.any(dim=1)  # (B,)
    T = response.shape[1]
    # argmax returns the first maximum: the first EOS; rows without one keep all T tokens
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, T, dtype=torch.long))
    positions = torch.arange(T, device=response.device)  # (T,)
    response_mask = positions.unsqueeze(0) <= first_eos.unsqueeze(1)  # (B, T)
    truncated = response.masked_fill(~response_mask, pad_token_id)
    return truncated, response_mask, ended


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Replace the score of every response that never produced EOS with ``penalty``.

    An unfinished answer is never a good one; without this the policy learns to ramble to the
    length limit [N-details, "penalty for responses without EOS", there −1].

    Shapes: scores ``(B,)``, ended ``(B,)`` bool → ``(B,)``.
    """
    return torch.where(ended, scores, torch.as_tensor(penalty, dtype=scores.dtype, device=scores.device))


def clip_scores(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip RM scores to [−clip, clip] (reward clipping, [N-details]; PPO for Atari used ±1).

    Shapes: ``(B,)`` → ``(B,)``.
    """
    return scores.clamp(-clip, clip)


def group_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Subtract from each score the mean score of the other samples of the same prompt.

    A reward model trained with the pairwise loss (InstructGPT eq. 1) only learns differences
    between answers to one prompt: any per-prompt offset leaves the loss unchanged, so the offset
    it ends up with is arbitrary and, to PPO, noise the critic must first learn away. With
    k = ``group_size`` samples per prompt the leave-one-out mean of the others is a baseline that
    does not depend on the sample itself, so the policy gradient stays unbiased [RLOO] §3.2:

        s'_i = s_i − 1/(k−1) · Σ_{j≠i} s_j            (j over the samples of i's prompt)

    Shapes: ``(B,)`` prompt-major (the k samples of a prompt are adjacent), B divisible by k → ``(B,)``.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(
            f"group_baseline needs group_size >= 2 dividing the batch, got {group_size} for {scores.shape[0]}"
        )
    g = scores.view(-1, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(scores.shape)


def whiten_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Scale per-token rewards to unit variance over the batch without shifting their mean.

    ``masked_whiten(rewards, response_mask, shift_mean=False)`` — the option ``whiten_rewards``
    of [N-details] and TRL; the mean is kept because shifting it would reward or punish length.

    Shapes: ``(B, T)`` → ``(B, T)``.
    """
    return masked_whiten(rewards, response_mask, shift_mean=False)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every token plus the RM score on the last one.

    [InstructGPT] eq. 2, per token as in [Ziegler] and [N-details]:

        r_t = −β · (log π(y_t) − log π_ref(y_t))            for every response token t
        r_{last} += score                                     last = the final unmasked token

    Args:
        scores: ``(B,)`` RM scores, already normalised / penalised / clipped as configured.
        logprobs: ``(B, T)`` of the policy that sampled the responses.
        ref_logprobs: ``(B, T)`` of the frozen reference (SFT) model.
        response_mask: ``(B, T)`` prefix-of-ones mask (see ``truncate_after_eos``).
        kl_coef: β.

    Returns:
        ``(rewards, kl)``, both ``(B, T)``, zero outside the mask; ``kl`` is the k1 estimate per
        token (sum it over T and average over B for the usual "KL" metric).

    Raises:
        ValueError: a row with no response token (the score would have nowhere to go) or a mask
        that is not a prefix of ones.
    """
    mask = response_mask.to(logprobs.dtype)
    _check_prefix_mask(response_mask)
    lengths = response_mask.to(torch.long).sum(dim=1)  # (B,)
    if (lengths == 0).any():
        raise ValueError("compute_rewards: a response has no token in response_mask; its score would be lost")
    kl = kl_k1(logprobs, ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = (lengths - 1).unsqueeze(1)  # (B, 1)
    rewards = rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded, variable-length responses.

    [GAE] eq. 16, with the episode ending after the last response token (V = 0 beyond it):

        δ_t = r_t + γ · V_{t+1} · m_{t+1} − V_t
        A_t = (δ_t + γλ · A_{t+1}) · m_t              A_T = 0, m = response_mask
        R_t = A_t + V_t                               (the value target, "returns")

    Vectorised over the batch, one reverse loop over T (as in [N-details] and CleanRL).
    Defaults γ = 1, λ = 0.95 are those of [InstructGPT]/[N-details].

    Args:
        rewards: ``(B, T)`` per-token rewards (``compute_rewards``).
        values: ``(B, T)`` critic values at the rollout, V_t = V(query, response[:t]).
        response_mask: ``(B, T)`` prefix-of-ones mask.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, zero outside the mask; not whitened (whiten
        the advantages with ``masked_whiten`` before the policy loss).
    """
    _check_prefix_mask(response_mask)
    mask = response_mask.to(values.dtype)
    values = values * mask  # padding must not leak a bootstrap value into the last token
    rewards = rewards * mask
    B, T = rewards.shape
    zeros = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value, next_advantage, next_mask = zeros, zeros, zeros
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]  # (B,)
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,)
        advantages_reversed.append(advantage)
        next_value, next_advantage, next_mask = values[:, t], advantage, mask[:, t]
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # share of tokens where the clipped term is the one used
    approx_kl: torch.Tensor  # mean k2 = ½ (log π − log π_old)², the [N-details] metric
    approx_kl_k3: torch.Tensor  # mean k3 = (ρ − 1) − log ρ, the CleanRL metric
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLossOutput:
    """Clipped surrogate policy loss, [PPO] eq. 7, averaged over response tokens.

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        L = mean_t max(−A_t · ρ_t, −A_t · clip(ρ_t, 1 − ε, 1 + ε))

    Args:
        logprobs: ``(B, T)`` of the policy being trained (with grad).
        old_logprobs: ``(B, T)`` recorded at rollout time (no grad).
        advantages: ``(B, T)``, usually whitened.
        response_mask: ``(B, T)``.
        clip_eps: ε.

    Returns:
        ``PolicyLossOutput``; all fields but ``loss`` are detached statistics.
    """
    mask = response_mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(mask.dtype), mask)
        # approx_kl http://joschu.net/blog/kl-approx.html (samples from π_old, r = π/π_old = ρ)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
        approx_kl_k3 = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        selected = response_mask.bool()
        ratio_mean = masked_mean(ratio, mask)
        ratio_min = ratio[selected].min() if selected.any() else ratio.new_tensor(float("nan"))
        ratio_max = ratio[selected].max() if selected.any() else ratio.new_tensor(float("nan"))
    return PolicyLossOutput(loss, clipfrac, approx_kl, approx_kl_k3, ratio_mean, ratio_min, ratio_max)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # share of tokens where the clipped error is the larger one


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss, as in OpenAI baselines' PPO2 and [N-details]:

        V_clip = V_old + clip(V − V_old, −ε, ε)
        L = ½ · mean_t max((V − R)², (V_clip − R)²)

    With ``clip_eps=None`` the plain ½ · mean_t (V − R)² (A2C's, [A3C] Algorithm S3).

    Args:
        values: ``(B, T)`` of the critic being trained (with grad).
        old_values: ``(B, T)`` recorded at rollout time.
        returns: ``(B, T)`` targets from ``compute_gae``.
        response_mask: ``(B, T)``.
        clip_eps: ε, in the units of the value (rewards); None: no clipping.

    Returns:
        ``ValueLossOutput(loss, clipfrac)`` (clipfrac 0 without clipping).
    """
    mask = response_mask.to(values.dtype)
    vf_losses = (values - returns) ** 2
    if clip_eps is None:
        return ValueLossOutput(0.5 * masked_mean(vf_losses, mask), vf_losses.new_zeros(()))
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(mask.dtype), mask)
    return ValueLossOutput(loss, clipfrac)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked tokens (CleanRL / baselines' diagnostic).

    1 = the critic predicts the returns perfectly, 0 = no better than a constant, < 0 = worse.
    NaN when the returns have zero variance. Shapes: ``(B, T)`` ×3 → scalar.
    """
    var_returns = masked_var(returns, response_mask)
    var_residual = masked_var(returns - values, response_mask)
    if var_returns.item() == 0:
        return var_returns.new_tensor(float("nan"))
    return 1.0 - var_residual / var_returns


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """β adapted towards a target KL, [Ziegler] §2.2 (``AdaptiveKLController`` in lm-human-preferences):

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    ``KL`` is the mean per-sequence KL of the last batch (k1 summed over the response) and
    ``n_steps`` the number of sequences (episodes) in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """A constant β (``update`` changes nothing); same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
