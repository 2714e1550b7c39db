"""The scalar head: a reward model (and, in PPO, the critic initialised from it).

We use transformers' own ``AutoModelForSequenceClassification`` with ``num_labels=1``, so a
saved reward model is a plain Hugging Face directory: the LM trunk plus a linear ``score``
head (no bias), loadable by ``AutoModelForSequenceClassification.from_pretrained(dir)``.

What is ours:
  - the head reads the hidden state of the *last response token* (the EOS), found from the
    attention mask (padded right or left), never from the pad id (SmolLM2's pad token *is* its EOS,
    GPT-2 has none); any causal LM's trunk works (``rlhfkit.models.layout.trunk``);
  - the head is initialised N(0, 1/(d+1)) (Stiennon et al. 2020, appendix; d = hidden size);
  - the normalisation offset (so the mean score of the reference answers is 0) is stored in
    ``config.json`` as ``reward_offset`` and subtracted by ``RewardModel.score``. With plain
    transformers: ``logits[:, 0] - config.reward_offset`` (inputs right-padded with
    ``config.pad_token_id``, which we set to a token that is not EOS so that transformers'
    "last non-pad token" rule finds the same EOS we read).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhfkit.accel.attention import additive_attention_mask
from rlhfkit.errors import UserError
from rlhfkit.models.layout import trunk
from rlhfkit.models.loading import disable_dropout, load_tokenizer, resolve_model_path
from rlhfkit.models.lora import unwrap


class RewardModel(nn.Module):
    """LM trunk + linear head; ``forward`` returns one raw score per sequence."""

    def __init__(self, seq_model: nn.Module):
        super().__init__()
        self.seq_model = seq_model  # an AutoModelForSequenceClassification(num_labels=1)
        self.config = seq_model.config

    @property
    def _inner(self) -> nn.Module:
        """The transformers model, under a PEFT wrapper if there is one (LoRA edits it in place)."""
        return unwrap(self.seq_model)

    @property
    def trunk(self) -> nn.Module:
        return trunk(self._inner)

    @property
    def head(self) -> nn.Module:
        return self._inner.score

    @property
    def offset(self) -> float:
        return float(getattr(self.config, "reward_offset", 0.0))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        last_index: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        row_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw scores (N,) read at (``row_index``, ``last_index``) — by default one per row (N = B), at
        the last attended token of a 2-D mask, padded right or left (positions count the attended
        tokens only, so a row scores the same however it is padded). Several scores per row (a prompt
        shared by its K responses, ``collate_shared_prompt``): a 4-D mask, ``position_ids`` and ``row_index``."""
        if attention_mask.dim() == 4:
            attention_mask = additive_attention_mask(self.trunk, attention_mask)
        elif position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, d)
        if last_index is None:  # the last attended column: right or left padding
            last_index = attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)
        if row_index is None:
            row_index = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[row_index, last_index]  # (N, d)
        return (
            self.head(h.to(self.head.weight.dtype if hasattr(self.head, "weight") else h.dtype)).squeeze(-1).float()
        )  # (B,)

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised scores: raw score minus the stored offset."""
        return self.forward(input_ids, attention_mask, last_index) - self.offset

    def save_pretrained(self, path, **kw) -> None:
        self.seq_model.save_pretrained(path, **kw)


def init_reward_head(head: nn.Linear, hidden_size: int, generator: torch.Generator | None = None) -> None:
    """N(0, 1/(d+1)) weights (std = 1/sqrt(d+1)), zero bias if any."""
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=generator)
        if head.bias is not None:
            head.bias.zero_()


def load_reward_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, object]:
    """A reward model from a saved RM directory (saved by ``rlhfkit rm``: it keeps its head), or a
    fresh head on any causal-LM checkpoint."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(spec)
    tok = load_tokenizer(spec)
    config = AutoConfig.from_pretrained(path)
    new_head = "reward_offset" not in config.to_dict()
    config.num_labels = 1
    if config.pad_token_id is None or config.pad_token_id == tok.eos_token_id:
        # transformers' own sequence-classification forward finds "the last non-pad token": a
        # pad id equal to EOS would make it skip the EOS we read. Any non-EOS id works: we
        # always use explicit masks.
        config.pad_token_id = 0 if tok.eos_token_id != 0 else 1
    try:
        if new_head:  # the head is missing from a causal-LM checkpoint on purpose: we initialise it below
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        try:
            seq_model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        finally:
            if new_head:
                hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {spec}: cannot load as a reward model ({str(e).splitlines()[0]})") from None
    disable_dropout(seq_model)
    if new_head:
        init_reward_head(seq_model.score, seq_model.score.in_features)
        seq_model.config.reward_offset = 0.0
    return RewardModel(seq_model), tok
