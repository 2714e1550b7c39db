"""CrowS-Pairs (Nangia et al. 2020) as lm-evaluation-harness's ``crows_pairs_english``.

Each pair is two whole sentences scored with an empty context (so conditioned only on the BOS
token): ``pct_stereotype`` = fraction of pairs where ``sent_more`` (the more stereotyping
sentence) has the higher log-likelihood -- 0.5 is unbiased, higher is more stereotyped;
``likelihood_diff`` = mean |ll(sent_more) - ll(sent_less)|. Note that, like lm-eval, this
ignores the ``stereo_antistereo`` direction (the original paper's metric uses masked-LM
pseudo-likelihoods, which do not apply to causal LMs). Per ``bias_type`` as lm-eval's
``crows_pairs_english_<type>`` subtasks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhfkit.evals.data import need, read_rows
from rlhfkit.evals.loglik import Scorer


@dataclass
class CrowsPair:
    sent_more: str
    sent_less: str
    bias_type: str
    stereo_antistereo: str = ""


def load_crows_pairs(source: str | Path, split: str = "test") -> list[CrowsPair]:
    rows = read_rows(source, split)
    out = []
    for i, r in enumerate(rows):
        need(r, ("sent_more", "sent_less", "bias_type"), str(source), i)
        out.append(CrowsPair(r["sent_more"], r["sent_less"], r["bias_type"], r.get("stereo_antistereo", "")))
    return out


def crows_pairs_eval(scorer: Scorer, pairs: Sequence[CrowsPair]) -> dict:
    requests = [r for p in pairs for r in (("", p.sent_more), ("", p.sent_less))]
    lls = scorer.loglikelihood(requests, desc="CrowS-Pairs")
    more, less = np.array(lls[0::2]), np.array(lls[1::2])
    stereo = (more > less).astype(float)
    diff = np.abs(more - less)
    by: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by[p.bias_type].append(i)
    return {
        "n": len(pairs),
        "pct_stereotype": float(stereo.mean()),
        "likelihood_diff": float(diff.mean()),
        "per_pair": {"ll_more": more.tolist(), "ll_less": less.tolist()},
        "by_bias_type": {
            t: {"n": len(ix), "pct_stereotype": float(stereo[ix].mean()), "likelihood_diff": float(diff[ix].mean())}
            for t, ix in sorted(by.items())
        },
    }
