"""The generation engine used by PPO rollouts, K-answer sampling for labeling, evaluation and chat.

    from rlhfkit.rollout import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    completions = engine.generate(prompt_ids, SamplingParams(max_new_tokens=128, temperature=1.0), n=4)

See ``engine.py`` for how a call runs and ``sampling.py`` for which log-probs are returned.
"""

from rlhfkit.rollout.engine import Completion, Engine, StreamEvent
from rlhfkit.rollout.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent"]
