"""Alignment tax: perplexity on held-out ordinary text, model vs baseline.

InstructGPT measured the "alignment tax" as regressions on public NLP tasks after RLHF. The
cheapest faithful proxy: perplexity of each model on text that neither saw in RLHF (default
the tail of tinyshakespeare). ppl = exp(total NLL / scored tokens); the text is tokenised as
one stream and scored in windows (see ``LoglikScorer.token_nll``). ``tax`` = ppl_M / ppl_B - 1
(> 0: the model got worse at ordinary text).
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.errors import UserError
from rlhfkit.evals.loglik import LoglikScorer, perplexity


def load_heldout_text(source, tail_chars: int | None = 20_000) -> str:
    """The held-out text: a text file, or the ``text`` fields of records (a .jsonl, a saved
    ``datasets`` directory, a hub dataset: tiny_shakespeare's test split is one record), joined
    by blank lines; by default only its last ``tail_chars`` characters."""
    from rlhfkit.evals.data import read_rows

    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        rows = read_rows(source, "test")
        if rows and "text" not in rows[0]:
            raise UserError(f"--tax-text {source}: records need a `text` field (has {', '.join(map(str, rows[0]))})")
        text = "\n\n".join(str(r.get("text") or "") for r in rows)
    if tail_chars:
        text = text[-tail_chars:]
    if not text.strip():
        raise UserError(f"--tax-text {source}: empty text")
    return text


def perplexity_eval(scorer: LoglikScorer, text: str, window: int = 512) -> dict:
    ids = scorer.tok_encode(text)
    nll, n = scorer.token_nll(ids, window=window)
    return {"tokens": n, "nll_per_token": nll / n if n else float("nan"), "perplexity": perplexity(nll, n)}


def alignment_tax(ppl_model: float, ppl_baseline: float) -> float:
    return ppl_model / ppl_baseline - 1.0
