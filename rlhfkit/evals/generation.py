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


def best_of_n_fn(
    generate: GenerateFn,
    reward_fn: Callable[[list[str], list[str]], list[float]] | None,
    n: int,
    temperature: float = 1.0,
    rm_prompts: dict[str, str] | None = None,
) -> GenerateFn:
    """A ``GenerateFn`` answering with the reward model's best of ``n`` samples (best-of-N,
    ``rlhfkit.algos.best_of_n``): each asked continuation is the best of ``n`` drawn at
    ``temperature`` (the caller's temperature is replaced: best-of-N samples the policy).

    ``reward_fn(prompts, responses) -> scores`` sees the prompt as ``rm_prompts`` maps it (the
    user's text behind a chat-formatted prompt), else the prompt as given. With ``n == 1`` it is
    one sample, the base policy the KL bound is measured from (no reward model needed).
    """
    from rlhfkit.algos.best_of_n import best_index

    rm_prompts = rm_prompts or {}

    def generate_best(prompts: list[str], k: int, max_new_tokens: int, _temperature: float) -> list[list[str]]:
        outs = generate(prompts, n * k, max_new_tokens, temperature)  # (B, k*n)
        if n == 1:
            return outs
        flat_p = [rm_prompts.get(p, p) for p, o in zip(prompts, outs) for _ in o]
        flat_s = reward_fn(flat_p, [c for o in outs for c in o])
        picked, at = [], 0
        for o in outs:
            s, at = flat_s[at : at + len(o)], at + len(o)
            picked.append([o[j * n + best_index(s[j * n : (j + 1) * n])] for j in range(k)])
        return picked

    return generate_best
