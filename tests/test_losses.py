"""Hand-computed values for the SFT masked NLL and the InstructGPT ranking loss."""

import math

import torch

from rlhfkit.algos.losses import masked_nll_sum, ranking_loss, ranking_metrics


def nls(x: float) -> float:
    """-log σ(x), by hand."""
    return math.log(1 + math.exp(-x))


def test_ranking_loss_k2_is_minus_logsigmoid_of_margin():
    # chosen scores 2.0, rejected 0.5 -> -log σ(1.5) = log(1 + e^-1.5) = 0.201413
    scores = torch.tensor([2.0, 0.5])
    per_prompt, pairs = ranking_loss(scores, torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert pairs.tolist() == [1.0]
    assert abs(per_prompt.item() - 0.2014132779827524) < 1e-6
    assert abs(per_prompt.item() - nls(1.5)) < 1e-6


def test_ranking_loss_k4_means_over_six_pairs():
    # scores 3, 2, 1, 0 for ranks 0..3: margins 1,2,3 (×3 pairs of margin 1: (0,1),(1,2),(2,3);
    # margin 2: (0,2),(1,3); margin 3: (0,3)) -> (3·nls(1) + 2·nls(2) + nls(3)) / 6
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0])
    per_prompt, pairs = ranking_loss(scores, torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long))
    expected = (3 * nls(1) + 2 * nls(2) + nls(3)) / 6  # = (0.93978 + 0.25385 + 0.04859) / 6 = 0.20704
    assert pairs.tolist() == [6.0]
    assert abs(per_prompt.item() - expected) < 1e-6
    assert abs(expected - 0.20704) < 1e-4


def test_every_prompt_weighs_the_same_whatever_its_k():
    # prompt 0: K=2 with margin 0 -> loss log 2; prompt 1: K=4 all margins 0 -> loss log 2 too.
    # A pair-level mean would weigh prompt 1 six times; per-prompt means keep them equal.
    scores = torch.tensor([0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    ranks = torch.tensor([0, 1, 0, 1, 2, 3])
    group = torch.tensor([0, 0, 1, 1, 1, 1])
    per_prompt, pairs = ranking_loss(scores, ranks, group)
    assert pairs.tolist() == [1.0, 6.0]
    assert torch.allclose(per_prompt, torch.tensor([math.log(2), math.log(2)]))
    # now prompt 1 is learned perfectly-ish: its loss shrinks but prompt 0 still counts half
    scores = torch.tensor([0.0, 0.0, 30.0, 20.0, 10.0, 0.0])
    per_prompt, _ = ranking_loss(scores, ranks, group)
    assert abs(per_prompt.mean().item() - math.log(2) / 2) < 1e-4


def test_ties_make_no_pair():
    # ranks [0, 1, 1]: pairs (0,1) and (0,2) only; the tied pair (1,2) contributes nothing
    scores = torch.tensor([1.0, 0.0, 100.0])
    per_prompt, pairs = ranking_loss(scores, torch.tensor([0, 1, 1]), torch.zeros(3, dtype=torch.long))
    assert pairs.tolist() == [2.0]
    assert abs(per_prompt.item() - (nls(1.0) + nls(-99.0)) / 2) < 1e-4


def test_ranking_loss_gradient_pushes_better_up():
    scores = torch.tensor([0.0, 0.0], requires_grad=True)
    per_prompt, _ = ranking_loss(scores, torch.tensor([0, 1]), torch.tensor([0, 0]))
    per_prompt.sum().backward()
    # d/ds_w of -log σ(s_w - s_l) at 0 = -(1 - σ(0)) = -0.5
    assert torch.allclose(scores.grad, torch.tensor([-0.5, 0.5]))


def test_ranking_metrics_by_hand():
    # ranks: a > b > c > d; scores order a > c > b > d -> 5 of 6 pairs right; top-1 right;
    # tau = (5 - 1) / 6 = 0.6667
    m = ranking_metrics([4.0, 2.0, 3.0, 1.0], [0, 1, 2, 3])
    assert m["pairs"] == 6 and m["pair_correct"] == 5
    assert m["top1"] == 1.0
    assert abs(m["kendall_tau"] - 4 / 6) < 1e-9
    # best-ranked response scored lowest
    m = ranking_metrics([0.0, 2.0, 1.0], [0, 1, 2])
    assert m["top1"] == 0.0 and m["pair_correct"] == 1
    # tau-b with a tie in the ranking: ranks [0, 1, 1], scores [3, 2, 1]
    # concordant (0,1),(0,2) = 2, discordant 0, tied in ranks 1: tau_b = 2 / sqrt(2 * 3)
    m = ranking_metrics([3.0, 2.0, 1.0], [0, 1, 1])
    assert abs(m["kendall_tau"] - 2 / math.sqrt(6)) < 1e-9
    assert m["pairs"] == 2


def test_masked_nll_counts_response_tokens_only():
    # vocabulary of 3; uniform logits everywhere except position 2, which predicts token 3's target
    logits = torch.zeros(1, 4, 3)
    logits[0, 2] = torch.tensor([0.0, math.log(2.0), 0.0])  # p(target=1) = 2/4 = 0.5
    input_ids = torch.tensor([[0, 2, 0, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1]])  # prompt = 2 tokens, response = 2 tokens
    nll, n = masked_nll_sum(logits, input_ids, loss_mask)
    # targets: token 2 (=0) from logits[1] (uniform: log 3), token 3 (=1) from logits[2] (log 2)
    assert n == 2
    assert abs(nll.item() - (math.log(3) + math.log(2))) < 1e-6
    # prompt tokens do not count, whatever their logits
    logits[0, 0] = torch.tensor([100.0, -100.0, 0.0])
    nll2, _ = masked_nll_sum(logits, input_ids, loss_mask)
    assert nll2.item() == nll.item()


# ---------------------------------------------------------------- found by mutation testing
# Each test below kills mutants of `make mutate` that the tests above let survive (docs/testing.md).


def test_ranking_loss_stays_in_float64():
    # the per-prompt sums and pair counts are kept in the scores' dtype: float64 in, float64 exact out
    scores = torch.tensor([2.0, 0.5], dtype=torch.float64)
    per_prompt, pairs = ranking_loss(scores, torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert per_prompt.dtype == pairs.dtype == torch.float64
    assert abs(per_prompt.item() - nls(1.5)) < 1e-15
    assert pairs.tolist() == [1.0]


def test_ranking_metrics_score_ties_count_as_pairs_not_as_concordant():
    # ranks a > b > c, scores 2, 1, 1: (a,b), (a,c) concordant, (b,c) tied in score only:
    # a pair the scores fail to order → pairs 3, correct 2; τ_b = 2 / sqrt((2 + 0)(2 + 1)) = 2/√6
    m = ranking_metrics([2.0, 1.0, 1.0], [0, 1, 2])
    assert (m["pairs"], m["pair_correct"]) == (3.0, 2.0)
    assert abs(m["kendall_tau"] - 2 / math.sqrt(6)) < 1e-12
    # two score ties: scores 1, 1, 0, 0 for ranks 0..3 → 4 concordant, 2 tied in score;
    # τ_b = 4 / sqrt(4 · (4 + 2)) = 4/√24
    m = ranking_metrics([1.0, 1.0, 0.0, 0.0], [0, 1, 2, 3])
    assert (m["pairs"], m["pair_correct"]) == (6.0, 4.0)
    assert abs(m["kendall_tau"] - 4 / math.sqrt(24)) < 1e-12


def test_ranking_metrics_rank_ties_and_double_ties():
    # ranks [0, 0, 1, 1], scores 4 > 3 > 2 > 1: 4 concordant pairs, 2 tied in rank only (no pair)
    # τ_b = 4 / sqrt((4 + 2) · 4) = 4/√24
    m = ranking_metrics([4.0, 3.0, 2.0, 1.0], [0, 0, 1, 1])
    assert (m["pairs"], m["pair_correct"]) == (4.0, 4.0)
    assert abs(m["kendall_tau"] - 4 / math.sqrt(24)) < 1e-12
    # a pair tied on both sides is skipped, and the pairs after it still count:
    # ranks [0, 0, 1], scores [1, 1, 0] → (a,c), (b,c) concordant → τ = 2 / sqrt(2 · 2) = 1
    m = ranking_metrics([1.0, 1.0, 0.0], [0, 0, 1])
    assert (m["pairs"], m["pair_correct"], m["kendall_tau"]) == (2.0, 2.0, 1.0)


def test_ranking_metrics_discordant_pairs():
    # ranks a > b > c > d, scores 3, 0, 1, 2: (a,·) 3 concordant; (b,c), (b,d), (c,d) discordant
    # → τ = (3 − 3) / 6 = 0; the top-scored response is the best one
    m = ranking_metrics([3.0, 0.0, 1.0, 2.0], [0, 1, 2, 3])
    assert (m["pairs"], m["pair_correct"], m["top1"]) == (6.0, 3.0, 1.0)
    assert m["kendall_tau"] == 0.0


def test_kendall_tau_of_one_pair_and_of_constant_scores():
    # K = 2 ordered right: τ = 1 / sqrt(1 · 1) = 1
    assert ranking_metrics([1.0, 0.0], [0, 1])["kendall_tau"] == 1.0
    # constant scores: τ_b is 0/0 → NaN (and the pair counts, unordered)
    m = ranking_metrics([1.0, 1.0], [0, 1])
    assert math.isnan(m["kendall_tau"])
    assert (m["pairs"], m["pair_correct"]) == (1.0, 0.0)


def test_pairwise_accuracy_counts_untied_pairs_within_each_prompt():
    """Prompt 0 ([3, 1, 2] ranked 0, 1, 2): 3 pairs, (0,1) and (0,2) ordered right, (1,2) wrong.
    Prompt 1: one pair whose scores tie, which counts as wrong. Prompt 2: a rank tie, no pair.
    Pairs across prompts never count (the 9.0 of prompt 2 would beat everything)."""
    from rlhfkit.algos.losses import pairwise_accuracy

    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 0.0, 9.0])
    ranks = torch.tensor([0, 1, 2, 0, 1, 0, 0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    correct, pairs = pairwise_accuracy(scores, ranks, group)
    assert (correct.item(), pairs.item()) == (2, 4)
    m = ranking_metrics([3.0, 1.0, 2.0], [0, 1, 2])  # the per-prompt report counts the same way
    assert (m["pair_correct"], m["pairs"]) == (2.0, 3.0)
