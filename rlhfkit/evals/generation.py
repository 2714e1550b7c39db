"""Text generation for the generation-based suites, behind one small interface.

    GenerateFn = (prompts: list[str], n: int, max_new_tokens: int, temperature: float)
                 -> list[list[str]]      # n continuations per prompt, new text only

Prompts are raw text (apply a chat template before, where wanted: ``chat_prompt``);
``temperature == 0`` means greedy. The default implementation, ``hf_generate_fn``, uses plain
``model.generate``. It is the ONE place to swap for the rollout engine (``rlhfkit.rollout``)
when it lands: every suite only sees a ``GenerateFn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.evals.loglik import progress

GenerateFn = Callable[[list[str], int, int, float], list[list[str]]]


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user turn in the model's chat template (plain text when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


def hf_generate_fn(
    model: torch.nn.Module,
    tokenizer,
    batch_size: int = 16,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
) -> GenerateFn:
    """A ``GenerateFn`` on ``transformers``' ``model.generate`` (left padding, batched)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def generate(prompts: list[str], n: int, max_new_tokens: int, temperature: float) -> list[list[str]]:
        gen = torch.Generator().manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]  # (P * n,)
        texts: list[str] = []
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batches = range(0, len(flat), batch_size)
            for s in progress(batches, total=len(batches), desc="generate", enabled=show_progress):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                enc = tokenizer(flat[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                if temperature > 0:
                    kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                out = model.generate(**{k: v.to(device) for k, v in enc.items()}, **kw)
                new = out[:, enc["input_ids"].shape[1] :]  # (B, new)
                texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            tokenizer.padding_side = old_side
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    return generate


def engine_generate_fn(model: torch.nn.Module, tokenizer, top_p: float = 1.0, seed: int = 0,
                       show_progress: bool = True, precision: str = "fp32") -> GenerateFn:  # fmt: skip
    """A ``GenerateFn`` on rlhfkit's rollout engine (``rlhfkit.rollout.Engine``): shared prefill
    of the n samples of a prompt and continuous batching. Select with ``EvalConfig.generator``."""
    from rlhfkit.rollout.engine import Engine
    from rlhfkit.rollout.sampling import SamplingParams

    engine = Engine(model, tokenizer, precision=precision)

    def generate(prompts: list[str], n: int, max_new_tokens: int, temperature: float) -> list[list[str]]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p if temperature > 0 else 1.0, seed=seed)  # fmt: skip
        outs = engine.generate(ids, params, n=n, progress=show_progress)  # prompt-major
        return [[c.text for c in outs[i * n : (i + 1) * n]] for i in range(len(prompts))]

    return generate
