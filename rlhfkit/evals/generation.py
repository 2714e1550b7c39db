"""Text generation for the generation-based suites, behind one small interface.

    GenerateFn = (prompts: list[str], n: int, max_new_tokens: int, temperature: float)
                 -> list[list[str]]      # n continuations per prompt, new text only

Prompts are raw text (apply a chat template before, where wanted: ``chat_prompt``);
``temperature == 0`` means greedy. ``generator_fn`` runs it on a rollout backend (``rlhfkit.rollout``:
the engine, transformers or vLLM, ``EvalConfig.rollout_backend``); every suite only sees a ``GenerateFn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GenerateFn = Callable[[list[str], int, int, float], list[list[str]]]


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user turn in the model's chat template (plain text when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


def generator_fn(
    model: torch.nn.Module,
    tokenizer,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
    precision: str = "fp32",
    backend: str = "auto",
) -> GenerateFn:
    """A ``GenerateFn`` on a rollout backend (``rlhfkit.rollout.make_generator``: the engine, with
    shared prefill of the n samples of a prompt and continuous batching, where it runs the model,
    else transformers' generate)."""
    from rlhfkit.rollout import SamplingParams, make_generator

    generator = make_generator(model, tokenizer, backend, precision)

    def generate(prompts: list[str], n: int, max_new_tokens: int, temperature: float) -> list[list[str]]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, seed=seed
        )
        outs = generator.generate(ids, params, n=n, progress=show_progress)  # prompt-major
        return [[c.text for c in outs[i * n : (i + 1) * n]] for i in range(len(prompts))]

    return generate
