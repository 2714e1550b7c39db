"""PPO math on hand-computed values (the expected numbers are worked out in the comments)."""

import json
import math
import re

import pytest
import torch

from rlhfkit.algos.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from rlhfkit.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    clip_scores,
    compute_gae,
    compute_rewards,
    explained_variance,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_after_eos,
    whiten_rewards,
)

E = math.e
LN2 = math.log(2.0)


def close(actual, expected, atol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------- masked statistics / whitening


def test_masked_mean_and_unbiased_var_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean of 1, 2, 3 = 2; squared deviations 1, 0, 1 → biased 2/3, unbiased 2/2 = 1
    close(masked_mean(values, mask), 2.0)
    close(masked_var(values, mask), 1.0)
    close(masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    close(masked_mean(torch.tensor([[1.0, 3.0], [5.0, 9.0]]), torch.tensor([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])


def test_masked_var_needs_two_elements():
    with pytest.raises(ValueError, match="one element"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="no element"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 0]]))


def test_masked_whiten_by_hand():
    values = torch.tensor([[2.0, 4.0, 6.0, 50.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 → (x − 4) / 2 = [−1, 0, 1]; padding → 0
    close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    # shift_mean=False adds the mean back: [3, 4, 5]
    close(masked_whiten(values, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], atol=1e-6)
    close(whiten_rewards(values, mask), [[3.0, 4.0, 5.0, 0.0]], atol=1e-6)
    # 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = math.sqrt(5.0 / 3.0)
    close(
        masked_whiten(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)),
        [[-1.5 / s, -0.5 / s], [0.5 / s, 1.5 / s]],
    )


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_are_temperature_scaled():
    # logits [0, 2 ln 3]: at τ = 1 the probabilities are [1/10, 9/10];
    # divided by τ = 2 they become [0, ln 3] → [1/4, 3/4]
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)], [0.0, 2 * math.log(3.0)]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.9), math.log(0.1)]])
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(0.75), math.log(0.25)]])
    # entropy of [1/4, 3/4] = −(¼ ln ¼ + ¾ ln ¾) = 0.5623351
    close(entropy_from_logits(logits, temperature=2.0), [[0.5623351446, 0.5623351446]])
    # uniform over V = 5 → ln 5
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5.0)))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, temperature=0.0)


def test_logprobs_match_log_softmax_and_bf16_is_upcast():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3
    tokens = torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature=0.7), expected, atol=1e-5)
    out = logprobs_from_logits(logits.bfloat16(), tokens, temperature=0.7)
    assert out.dtype == torch.float32
    close(out, expected, atol=0.1)  # only the bf16 rounding of the inputs remains
    # differentiable: d logp(y) / d z_y = (1 − p_y) / τ
    z = logits.clone().requires_grad_(True)
    logprobs_from_logits(z, tokens, temperature=0.7).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_logprob_gradient_by_hand_and_against_autograd():
    # d log p_y / d z_v = (1[v = y] − p_v) / τ. logits [0, 2 ln 3], τ = 2 → p = [1/4, 3/4]; token 1
    # with upstream gradient 1: [−1/8, 1/8]; token 0 with upstream 2: 2 · [3/4, −3/4] / 2 = [3/4, −3/4]
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)], [0.0, 2 * math.log(3.0)]]], requires_grad=True)
    (logprobs_from_logits(logits, torch.tensor([[1, 0]]), 2.0) * torch.tensor([[1.0, 2.0]])).sum().backward()
    close(logits.grad, [[[-0.125, 0.125], [0.75, -0.75]]])
    # the hand-written backward equals autograd through log_softmax (fp32 and bf16, τ = 1 and 0.7;
    # a token repeated in a row), and logprobs_and_entropy's log-probs are differentiable the same
    torch.manual_seed(1)
    for dtype, tau in ((torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 0.7), (torch.bfloat16, 1.0)):
        x = (torch.randn(3, 5, 40) * 4).to(dtype)
        tokens = torch.randint(0, 40, (3, 5))
        tokens[0, 1] = tokens[0, 0]
        g = torch.randn(3, 5)
        a, b, c = (x.clone().requires_grad_(True) for _ in range(3))
        ref = torch.log_softmax(a.float() / tau, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        (ref * g).sum().backward()
        (logprobs_from_logits(b, tokens, tau) * g).sum().backward()
        lp, ent = logprobs_and_entropy(c, tokens, tau)
        (lp * g).sum().backward()
        assert b.grad.dtype == dtype and not ent.requires_grad
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        close(b.grad.float(), a.grad.float(), atol=tol)
        assert torch.equal(b.grad, c.grad)
        close(ent, entropy_from_logits(x, tau), atol=1e-4)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # π = 1/2, π_ref = 1/4 on the sampled token: k1 = ln 2, k2 = ½ ln² 2 = 0.2402265,
    # r = π_ref/π = 1/2 → k3 = (½ − 1) − ln ½ = ln 2 − ½ = 0.1931472
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_k1(logp, ref), [LN2])
    close(kl_k2(logp, ref), [0.5 * LN2**2])
    close(kl_k3(logp, ref), [LN2 - 0.5])
    # swapped: k1 = −ln 2 (k1 can be negative), r = 2 → k3 = 1 − ln 2 = 0.3068528 (never negative)
    close(kl_k1(ref, logp), [-LN2])
    close(kl_k3(ref, logp), [1.0 - LN2])


def test_k1_and_k3_are_unbiased():
    # exact expectation under π over a 3-token vocabulary equals KL[π‖π_ref]
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    close((p * kl_k1(p.log(), q.log())).sum(), kl, atol=1e-12)
    close((p * kl_k3(p.log(), q.log())).sum(), kl, atol=1e-12)
    assert (kl_k3(p.log(), q.log()) >= 0).all()


# ---------------------------------------------------------------- EOS, scores, rewards


def test_truncate_after_eos_and_missing_eos_penalty():
    eos, pad = 2, 0
    response = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 2, 3, 2]])
    truncated, mask, ended = truncate_after_eos(response, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    # the EOS itself stays in the mask; a response without EOS keeps every token
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert ended.tolist() == [True, False, True]
    # several stop ids: stop at whichever comes first
    truncated, mask, ended = truncate_after_eos(torch.tensor([[5, 3, 2, 1]]), (2, 3), pad)
    assert truncated.tolist() == [[5, 3, 0, 0]] and ended.tolist() == [True]
    # the response that never ended gets the penalty instead of its score
    scores = torch.tensor([0.5, 0.7, -0.1])
    close(apply_missing_eos_penalty(scores, torch.tensor([True, False, True]), -1.0), [0.5, -1.0, -0.1])
    close(clip_scores(torch.tensor([-7.0, 0.3, 9.0]), 5.0), [-5.0, 0.3, 5.0])


def test_compute_rewards_by_hand():
    kl_coef = 0.1
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, 0.5])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    # row 0: kl = [0.5, 0, −1] → −β·kl = [−0.05, 0, 0.1], score 2 on the last token → 2.1
    # row 1: kl = [1, 0, (pad)] → [−0.1, 0, 0], score 0.5 on token 1, the last unmasked one
    close(kl, [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 2.1], [-0.1, 0.5, 0.0]])
    with pytest.raises(ValueError, match="no token"):
        compute_rewards(scores, logprobs, ref_logprobs, torch.tensor([[1, 1, 1], [0, 0, 0]]), kl_coef)
    with pytest.raises(ValueError, match="prefix of ones"):
        compute_rewards(scores, logprobs, ref_logprobs, torch.tensor([[1, 0, 1], [1, 1, 0]]), kl_coef)


# ---------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 + 0 − 0.5 = 0.5 → A2 = 0.5; δ1 = 0 + 0.5 − 0.5 = 0 → A1 = 0.5·0.5 = 0.25;
    #        δ0 = 0 → A0 = 0.125; R = A + V = [0.625, 0.75, 1.0]
    # row 1: the padded token (reward 5, value 9) is ignored: δ1 = 1 − 0.5 → A1 = 0.5, A0 = 0.25
    close(advantages, [[0.125, 0.25, 0.5], [0.25, 0.5, 0.0]])
    close(returns, [[0.625, 0.75, 1.0], [0.75, 1.0, 0.0]])
    # λ = 1, V = 0: advantages are the discounted reward-to-go, γ = 0.5 → [1.75, 1.5, 1]
    advantages, _ = compute_gae(torch.ones(1, 3), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(advantages, [[1.75, 1.5, 1.0]])


def test_gae_credit_of_the_first_token_with_a_zero_critic():
    """Why the pipeline runs λ = 1: with values still 0 (a fresh value head) and the score on the
    last of 60 tokens, λ = 0.95 gives the first token 0.95^59 ≈ 4.9 % of the score, λ = 1 all of it."""
    T = 60
    rewards = torch.zeros(1, T, dtype=torch.float64)
    rewards[0, -1] = 1.0
    zero, ones = torch.zeros(1, T, dtype=torch.float64), torch.ones(1, T)
    a95, _ = compute_gae(rewards, zero, ones, gamma=1.0, lam=0.95)
    a1, _ = compute_gae(rewards, zero, ones, gamma=1.0, lam=1.0)
    assert a95[0, 0].item() == pytest.approx(0.95**59) and a95[0, 0].item() < 0.05
    close(a1, torch.ones(1, T, dtype=torch.float64))


def gae_plain_loop(rewards, values, length, gamma, lam):
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    returns = [a + v if t < length else 0.0 for t, (a, v) in enumerate(zip(advantages, values))]
    return advantages, returns


def test_gae_matches_plain_loop_on_variable_lengths():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 5, 8, 0.99, 0.95
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [8, 1, 5, 3, 7]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b, length in enumerate(lengths):
        exp_adv, exp_ret = gae_plain_loop(rewards[b].tolist(), values[b].tolist(), length, gamma, lam)
        close(advantages[b], exp_adv, atol=1e-12)
        close(returns[b], exp_ret, atol=1e-12)


# ---------------------------------------------------------------- clipped losses


def test_policy_loss_all_clipped():
    old = torch.zeros(1, 3)
    logprobs = old + 1.0  # ratio will be [e, e, e]
    mask = torch.ones(1, 3)
    # A = +1: unclipped −e, clipped ratio becomes 1.2 → max(−e, −1.2) = −1.2 on every token
    out = ppo_policy_loss(logprobs, old, torch.ones(1, 3), mask, clip_eps=0.2)
    close(out.loss, -1.2)
    close(out.clipfrac, 1.0)
    # A = −1: max(e, 1.2) = e, the unclipped term → no clipping
    out = ppo_policy_loss(logprobs, old, -torch.ones(1, 3), mask, clip_eps=0.2)
    close(out.loss, E)
    close(out.clipfrac, 0.0)


def test_policy_loss_mixed_by_hand():
    old = torch.zeros(1, 4)
    logprobs = torch.tensor([[1.0, 0.0, -1.0, 5.0]], requires_grad=True)  # ratio [e, 1, 1/e, (e⁵ padded)]
    advantages = torch.tensor([[1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # token 0: max(−e, −1.2) = −1.2 (clipped); token 1: max(1, 1) = 1; token 2: max(1/e, 0.8) = 0.8 (clipped)
    close(out.loss, (-1.2 + 1.0 + 0.8) / 3)
    close(out.clipfrac, 2.0 / 3.0)
    # approx_kl = ½·mean(log ρ²) = ½·(1 + 0 + 1)/3; k3 = mean((ρ − 1) − log ρ) = (e − 2 + 0 + 1/e)/3
    close(out.approx_kl, 1.0 / 3.0)
    close(out.approx_kl_k3, (E - 2.0 + 1.0 / E) / 3.0)
    close(out.ratio_mean, (E + 1.0 + 1.0 / E) / 3.0)
    close(out.ratio_min, 1.0 / E)
    close(out.ratio_max, E)
    # only the unclipped token 1 carries a gradient: d/dlogp(−A·ρ) = −A·ρ = 1, over 3 tokens
    out.loss.backward()
    close(logprobs.grad, [[0.0, 1.0 / 3.0, 0.0, 0.0]])


def test_value_loss_by_hand():
    old_values = torch.zeros(1, 4)
    values = torch.tensor([[1.0, 0.1, -1.0, 7.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token 0: V_clip = 0.2: max(0², 0.8²) = 0.64 (clipped error larger)
    # token 1: V_clip = 0.1: max(0.9², 0.9²) = 0.81
    # token 2: V_clip = −0.2: max(1², 0.2²) = 1
    close(out.loss, 0.5 * (0.64 + 0.81 + 1.0) / 3)
    close(out.clipfrac, 1.0 / 3.0)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.full((1, 4), 2.5), returns, mask), 0.0)
    # residual R − V = [−0.5, 0.5, −0.5, 0.5]: unbiased var 1/3 against Var[R] = 5/3 → 1 − 0.2 = 0.8
    close(explained_variance(returns + torch.tensor([[0.5, -0.5, 0.5, -0.5]]), returns, mask), 0.8)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_steps():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 − 1 = 0.5, clipped to 0.2 → β·(1 + 0.2·256/10000) = 0.1·1.00512
    close(ctl.update(9.0, n_steps=256), 0.100512, atol=1e-12)
    # KL 3: error −0.5 → −0.2 → ×0.99488 → 0.09999737856
    close(ctl.update(3.0, n_steps=256), 0.09999737856, atol=1e-12)
    # KL 6.6: error 0.1 (inside the clip) → ×(1 + 0.1·1000/10000) = ×1.01
    close(ctl.update(6.6, n_steps=1000), 0.09999737856 * 1.01, atol=1e-12)
    # at the target nothing changes
    before = ctl.value
    assert ctl.update(6.0, n_steps=256) == before


def test_kl_controllers_resume_exactly():
    kls = [9.0, 3.0, 7.0, 5.5, 12.0, 6.2]
    full = AdaptiveKLController(0.05, target=6.0, horizon=1000)
    first = AdaptiveKLController(0.05, target=6.0, horizon=1000)
    expected = [full.update(kl, 64) for kl in kls]
    got = [first.update(kl, 64) for kl in kls[:3]]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    got += [resumed.update(kl, 64) for kl in kls[3:]]
    assert got == expected  # bit-identical
    fixed = FixedKLController(0.2)
    assert fixed.update(100.0, 64) == 0.2
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.2


def test_group_baseline_leave_one_out_by_hand():
    from rlhfkit.algos.ppo import group_baseline

    # two prompts x 3 samples, prompt-major
    scores = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 2.0])
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5
    # prompt 2: -1 - (-1+2)/2 = -1.5, -1.5, 2 - (-1-1)/2 = 3
    assert group_baseline(scores, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    # a per-prompt offset leaves it unchanged: that is the point
    offset = torch.tensor([10.0] * 3 + [-4.0] * 3)
    assert group_baseline(scores + offset, 3).tolist() == pytest.approx(group_baseline(scores, 3).tolist())
    # k = 2: the difference of the pair, antisymmetric
    assert group_baseline(torch.tensor([0.5, -0.25]), 2).tolist() == pytest.approx([0.75, -0.75])
    with pytest.raises(ValueError):
        group_baseline(scores, 4)
    with pytest.raises(ValueError):
        group_baseline(scores, 1)


# ---------------------------------------------------------------- found by mutation testing
# Each test below kills mutants of `make mutate` that the tests above let survive (docs/testing.md).


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message, not a substring of it."""
    return "^" + re.escape(message) + "$"


def test_statistics_keep_the_values_dtype_whatever_the_mask_dtype():
    # a float64 mask (e.g. built with numpy) must not turn float32 statistics into float64
    values = torch.tensor([[2.0, 4.0, 6.0, 50.0]])  # float32
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mean = masked_mean(values, mask)
    assert mean.dtype == torch.float32 and mean.item() == 4.0
    var = masked_var(values, mask)  # (4 + 0 + 4) / 2
    assert var.dtype == torch.float32 and var.item() == 4.0
    whitened = masked_whiten(values, mask)
    assert whitened.dtype == torch.float32
    close(whitened, [[-1.0, 0.0, 1.0, 0.0]])
    # rewards: a float mask selects the last token just like an int or bool one
    rewards, kl = compute_rewards(
        torch.tensor([2.0]),
        torch.tensor([[-1.0, -2.0, -3.0, -4.0]]),
        torch.tensor([[-1.5, -2.0, -2.0, -4.0]]),
        mask,
        kl_coef=0.1,
    )
    assert rewards.dtype == kl.dtype == torch.float32
    close(rewards, [[-0.05, 0.0, 2.1, 0.0]])  # kl [0.5, 0, -1, (pad)]
    advantages, returns = compute_gae(torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.zeros(1, 4), mask, gamma=1.0, lam=0.5)
    assert advantages.dtype == returns.dtype == torch.float32
    close(advantages, [[0.25, 0.5, 1.0, 0.0]])
    out = ppo_policy_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4), mask)
    assert out.loss.dtype == torch.float32 and out.loss.item() == -1.0
    vout = ppo_value_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4), mask)
    assert vout.loss.dtype == torch.float32 and vout.loss.item() == 0.5


def test_gae_keeps_bf16():
    # bf16 rollouts give bf16 advantages (the first step's zero bootstrap must not promote them)
    values = torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16)
    advantages, returns = compute_gae(
        torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16), values, torch.ones(1, 2), 1.0, 1.0
    )
    assert advantages.dtype == returns.dtype == torch.bfloat16
    # δ1 = 1 − 0.5 = 0.5; δ0 = 0 + 0.5 − 0.5 = 0 → A0 = 0.5; R = A + V = [1, 1]
    assert advantages.float().tolist() == [[0.5, 0.5]] and returns.float().tolist() == [[1.0, 1.0]]


def test_scores_of_another_dtype_land_on_the_last_token():
    # an RM in float64 (or bf16) gives scores of another dtype than the float32 log-probs
    rewards, _ = compute_rewards(
        torch.tensor([0.25], dtype=torch.float64),
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.tensor([[True, True]]),
        kl_coef=0.1,
    )
    assert rewards.dtype == torch.float32 and rewards.tolist() == [[0.0, 0.25]]


def test_missing_eos_penalty_is_exact_in_the_scores_dtype():
    # −0.1 as float64, not float32's −0.10000000149
    scores = torch.tensor([0.5, 0.7], dtype=torch.float64)
    out = apply_missing_eos_penalty(scores, torch.tensor([True, False]), -0.1)
    assert out.dtype == torch.float64 and out.tolist() == [0.5, -0.1]


def test_eos_handling_stays_on_the_responses_device():
    # "meta" stands in for a GPU here: a tensor made on the default (CPU) device would not mix with it
    response = torch.tensor([[5, 2, 7], [5, 6, 7]], device="meta")
    truncated, mask, ended = truncate_after_eos(response, [2, 3], pad_token_id=0)
    assert truncated.device.type == mask.device.type == ended.device.type == "meta"
    assert mask.shape == (2, 3)
    truncated, mask, ended = truncate_after_eos(response, 2, pad_token_id=0)
    assert truncated.device.type == "meta"
    scores = torch.zeros(2, device="meta")
    assert apply_missing_eos_penalty(scores, ended, -1.0).device.type == "meta"


def test_masked_whiten_eps_is_added_to_the_variance():
    # var 4 (see above) + eps 1 → divide by sqrt(5)
    values = torch.tensor([[2.0, 4.0, 6.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    s5 = math.sqrt(5.0)
    close(masked_whiten(values, mask, eps=1.0), [[-2.0 / s5, 0.0, 2.0 / s5, 0.0]])


def test_entropy_default_temperature_is_one():
    # logits [0, ln 3] → p = [1/4, 3/4] at τ = 1 → H = 0.5623351 (τ = 2 would give p ∝ [1, √3])
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]])), [[0.5623351446]])


def test_error_messages_say_what_is_wrong():
    with pytest.raises(ValueError, match=exactly("masked_var: the mask selects no element")):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 0]]))
    with pytest.raises(
        ValueError, match=exactly("masked_var: the mask selects one element; the unbiased variance needs two")
    ):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))
    prefix = (
        "response_mask must be a prefix of ones in every row (right-padded responses, "
        "1 up to and including EOS, 0 after)"
    )
    with pytest.raises(ValueError, match=exactly(prefix)):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))
    with pytest.raises(
        ValueError, match=exactly("compute_rewards: a response has no token in response_mask; its score would be lost")
    ):
        compute_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0, 0]]), 0.1)
    from rlhfkit.algos.ppo import group_baseline

    with pytest.raises(
        ValueError, match=exactly("group_baseline needs group_size >= 2 dividing the batch, got 4 for 6")
    ):
        group_baseline(torch.zeros(6), 4)


def test_adaptive_kl_controller_rejects_a_zero_target_or_horizon():
    for target, horizon in [(0.0, 10.0), (-1.0, 10.0), (6.0, 0.0), (6.0, -5.0)]:
        with pytest.raises(
            ValueError, match=exactly(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        ):
            AdaptiveKLController(0.1, target=target, horizon=horizon)


def test_gae_defaults_are_gamma_1_lambda_095():
    # V = 0, reward 1 on the last of 3 tokens: A = [λ², λ, 1] with γ = 1, λ = 0.95
    advantages, returns = compute_gae(
        torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3)
    )
    close(advantages, [[0.9025, 0.95, 1.0]], atol=1e-12)
    close(returns, [[0.9025, 0.95, 1.0]], atol=1e-12)


def test_policy_loss_ratio_is_against_the_old_policy_with_default_clip():
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    log_ratio = torch.tensor([[math.log(1.1), math.log(2.0), -math.log(2.0)]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    out = ppo_policy_loss(old + log_ratio, old, advantages, torch.ones(1, 3))  # default ε = 0.2
    # ratio [1.1, 2, 1/2]: token 0 inside the clip: −1.1; token 1: max(−2, −1.2) = −1.2 (clipped);
    # token 2 (A = −1): max(0.5, 0.8) = 0.8 (clipped) → (−1.1 − 1.2 + 0.8) / 3 = −0.5
    close(out.loss, -0.5, atol=1e-12)
    assert out.clipfrac.dtype == torch.float64
    close(out.clipfrac, 2.0 / 3.0, atol=1e-12)
    close(out.ratio_mean, (1.1 + 2.0 + 0.5) / 3.0, atol=1e-12)
    # k2 = ½ mean(log² ρ); k3 = mean((ρ − 1) − log ρ) = (0.1 − ln 1.1 + 1 − ln 2 − ½ + ln 2) / 3
    close(out.approx_kl, 0.5 * (math.log(1.1) ** 2 + 2 * math.log(2.0) ** 2) / 3.0, atol=1e-12)
    close(out.approx_kl_k3, (0.6 - math.log(1.1)) / 3.0, atol=1e-12)


def test_policy_loss_with_no_response_token_gives_nan_statistics():
    out = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    for value in (out.loss, out.clipfrac, out.ratio_mean, out.ratio_min, out.ratio_max):
        assert math.isnan(value.item())


def test_value_loss_clips_both_ways_around_old_values_with_default_clip():
    old = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.0, 1.1, 3.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0, 3.0]], dtype=torch.float64)
    out = ppo_value_loss(values, old, returns, torch.ones(1, 3))  # default ε = 0.2
    # token 0: V − V_old = −1 → V_clip = 0.8: max(0², 0.8²) = 0.64 (clipped below)
    # token 1: V − V_old = 0.1 → V_clip = 1.1: max(0.9², 0.9²) = 0.81
    # token 2: V − V_old = 2 → V_clip = 1.2: max(0², 1.8²) = 3.24 (clipped above)
    close(out.loss, 0.5 * (0.64 + 0.81 + 3.24) / 3.0, atol=1e-12)
    assert out.clipfrac.dtype == torch.float64
    close(out.clipfrac, 2.0 / 3.0, atol=1e-12)


def test_explained_variance_when_var_returns_is_one_and_zero():
    # R = [1, 2, 3]: unbiased Var[R] = 1; R − V = [0, 0, −1]: mean −1/3, Var = (1/9 + 1/9 + 4/9) / 2 = 1/3
    returns = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    close(
        explained_variance(torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64), returns, torch.ones(1, 3)),
        2.0 / 3.0,
        atol=1e-12,
    )
    # constant returns: nothing to explain → NaN, not a division by zero
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.full((1, 3), 2.0), torch.ones(1, 3)).item())
