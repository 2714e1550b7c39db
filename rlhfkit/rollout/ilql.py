"""Generation from an ILQL model: transformers' ``generate`` on the perturbed logits log π + β (Q̂ − V).

    gen = ILQLGenerator(model, tokenizer, heads, beta)    # what make_generator returns for an ILQL dir
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=128), n=4)

It is ``HFGenerator`` (``rlhfkit.rollout.hf``) with two forward hooks held for the length of each
call: one on the trunk keeps its last hidden state h (B, d) of the step, one on the model replaces
the step's logits by ``algos.ilql.perturbed_logits(logits, Q̂(h), V(h), β)`` (Snell et al. 2022,
eq. 4; Q̂ = min of the target heads, as TRLX). Everything after the model's forward — greedy,
temperature, top-k/top-p, the recorded log-probs, stops, n samples, seeds, streaming — is
HFGenerator's, on those logits, so the Completions' log-probs are the ILQL policy's. β = 0 leaves
log π, whose argmax and samples are the LM's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhfkit.algos.ilql import perturbed_logits
from rlhfkit.models.ilql import ILQLHeads
from rlhfkit.models.layout import trunk
from rlhfkit.models.lora import unwrap
from rlhfkit.rollout.hf import HFGenerator
from rlhfkit.rollout.requests import Completion, StreamEvent
from rlhfkit.rollout.sampling import SamplingParams


class ILQLGenerator:
    """The ``Generator`` protocol (``rlhfkit.rollout.backends``) for an LM with ILQL heads."""

    def __init__(self, model: torch.nn.Module, tokenizer, heads: ILQLHeads, beta: float, precision: str = "auto", **kw):
        self.inner = HFGenerator(model, tokenizer, precision=precision, **kw)
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, self.inner.eos_ids
        param = next(model.parameters())
        self.heads = heads.to(device=param.device, dtype=param.dtype).eval()
        self.beta = beta

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def push_weights(self, model: torch.nn.Module) -> float:
        """Only on-policy training (PPO, RLOO, GRPO) pushes new weights, and this policy is not theirs:
        the heads were learned on the saved LM and would not follow it, and the log-probs recorded
        would be those of log π + β (Q̂ − V), not of the model being trained."""
        from rlhfkit.errors import UserError

        where = getattr(self.model.config, "_name_or_path", "the model")
        raise UserError(
            f"{where} has ILQL heads: on-policy training samples from the LM alone; start it from a copy of "
            "the directory without ilql.json and ilql_heads.safetensors"
        )

    def generate(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        progress: bool = False,
    ) -> list[Completion]:
        with self._perturbed():
            return self.inner.generate(prompts, params, n, progress)

    def stream(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
    ) -> Iterator[StreamEvent]:
        with self._perturbed():  # held until the stream is closed (HFGenerator joins its thread first)
            yield from self.inner.stream(prompts, params, n)

    @contextmanager
    def _perturbed(self):
        """The two hooks (see the module docstring), registered before HFGenerator's own logits hook
        so that it records the perturbed logits."""
        model = unwrap(self.model)
        hidden: list[torch.Tensor] = []  # the step's last hidden state (B, d)

        def keep(module, args, output) -> None:
            h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            hidden[:] = [h[:, -1]]

        def perturb(module, args, output):
            h = hidden[0]
            q = self.heads.target_q(h, model.get_output_embeddings().weight)  # (B, V)
            new = perturbed_logits(output.logits[:, -1], q, self.heads.value(h), self.beta)
            output.logits[:, -1] = new.to(output.logits.dtype)
            return output

        hooks = [trunk(model).register_forward_hook(keep), model.register_forward_hook(perturb)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
