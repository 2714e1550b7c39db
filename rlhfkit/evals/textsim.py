"""Text similarity for TruthfulQA generation and reference-based judging: ROUGE-L and BLEU.

Small pure-Python versions (no extra dependency), both in [0, 1]:
  - ``rouge_l``: ROUGE-L F1 = 2PR/(P+R) with P = LCS/len(hyp), R = LCS/len(ref), on
    ``rouge_score``'s default tokens (lower-cased, runs of [a-z0-9]; no stemming);
  - ``bleu``: sentence BLEU-4 with the 'exp' smoothing and 13a-style tokenisation of sacrebleu
    (the paper's BLEU): geometric mean of modified n-gram precisions, where the k-th n-gram
    order with no match counts 1 / (2^k * total), times the brevity penalty exp(1 - r/c) if c < r.
    (sacrebleu's score / 100; lm-eval reports it on the 0-100 scale.)
"""

from __future__ import annotations

import math
import re
from collections import Counter


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_len(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str) -> float:
    h, r = rouge_tokens(hyp), rouge_tokens(ref)
    lcs = lcs_len(h, r)
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return 2 * p * rc / (p + rc)


def bleu_tokens(text: str) -> list[str]:
    """sacrebleu's 13a tokenizer (mteval-v13a), without its HTML-entity unescaping."""
    s = f" {text.strip()} "
    s = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", s)
    s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)
    s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)
    s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
    return s.split()


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def bleu(hyp: str, ref: str, max_n: int = 4) -> float:
    h, r = bleu_tokens(hyp), bleu_tokens(ref)
    if not h:
        return 0.0
    log_p, smooth = 0.0, 1.0
    for n in range(1, max_n + 1):
        total = max(len(h) - n + 1, 0)
        if total == 0:
            return 0.0  # no n-grams of this order: sacrebleu (without effective order) gives 0
        hn, rn = _ngrams(h, n), _ngrams(r, n)
        match = sum(min(c, rn[g]) for g, c in hn.items())
        if match == 0:
            smooth *= 2
            p = 1.0 / (smooth * total)
        else:
            p = match / total
        log_p += math.log(p)
    bp = 1.0 if len(h) >= len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(log_p / max_n)
