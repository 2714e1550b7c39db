"""Generation for PPO rollouts, K-answer sampling for labeling, evaluation and chat.

    from rlhfkit.rollout import SamplingParams, make_generator
    gen = make_generator(model, tokenizer, backend="auto")  # the engine where it runs the model, else transformers
    completions = gen.generate(prompt_ids, SamplingParams(max_new_tokens=128, temperature=1.0), n=4)

See ``backends.py`` for the backends (engine, hf, vllm), ``engine.py`` for how the engine runs a
call, ``hf.py`` for transformers' generate, ``requests.py`` for what a call takes and returns (shared by
all three), and ``sampling.py`` for which log-probs are returned.
"""

from rlhfkit.rollout.backends import Generator, make_generator
from rlhfkit.rollout.engine import Completion, Engine, StreamEvent
from rlhfkit.rollout.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Generator", "SamplingParams", "StreamEvent", "make_generator"]
