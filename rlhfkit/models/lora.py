"""The one way into a peft (LoRA) wrapper."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module, merge: bool = False) -> nn.Module:
    """The transformers model inside a peft wrapper; a model without one comes back as it is.

    ``merge=False``: the base model with the LoRA layers still injected in its modules (for
    forwards through its submodules: trunk, LM head, score head). ``merge=True``: the adapters
    merged into the weights and removed (peft's ``merge_and_unload``), the plain model to save.
    """
    if merge:
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model
