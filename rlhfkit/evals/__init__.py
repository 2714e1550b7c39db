"""Evaluation: helpful, truthful, harmless, and the alignment tax (InstructGPT section 4).

Suites (``rlhfkit eval --suite ...``):
  - ``truthful``: TruthfulQA MC1/MC2 by log-likelihood (as lm-evaluation-harness) and
    generation scored by ROUGE-L/BLEU max-similarity differences  -> ``truthfulqa.py``
  - ``harmless``: RealToxicityPrompts continuations (expected max toxicity, toxicity
    probability) -> ``toxicity.py``; CrowS-Pairs stereotype score -> ``crows_pairs.py``
  - ``helpful``: win-rate of a model against a baseline under a pluggable judge, bootstrap CI,
    length difference -> ``helpful.py``
  - ``tax``: perplexity on held-out text, model vs baseline -> ``tax.py``
Log-likelihoods: ``loglik.py``; generation: ``generation.py`` (one function to swap for the
rollout engine); running and reports: ``runner.py``, ``report.py``; the CLI: ``command.py``.
"""
