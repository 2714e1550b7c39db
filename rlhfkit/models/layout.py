"""Where a Hugging Face model keeps its parts, for the forwards that split it in two: the trunk
(the decoder without its LM head), the width of its hidden states, and the logits the model's own
forward makes from them.

PPO, PPO-ptx and the log-likelihood scorer run the trunk over whole sequences but the (large) LM
head only where a token is scored; the reward model and the critic put a scalar head on the trunk.
Nothing here assumes LLaMA's attribute names (``model.model``, ``model.lm_head``,
``config.hidden_size``): the trunk is ``get_decoder()`` (else the ``base_model_prefix``
attribute), the head ``get_output_embeddings()``.

A family's forward may do more after the head: Gemma soft-caps the logits (``tanh(z / c) · c``),
Cohere multiplies them by ``logit_scale``, Granite divides them by ``logits_scaling``.
``head_logits`` applies those; ``split_is_exact`` checks once per model, on a few tokens, that
trunk + ``head_logits`` gives exactly the logits of ``model(input_ids)``, and where it does not
(a family doing something else) ``scored_forward`` runs the whole model instead: slower, never wrong.
A model sharded by FSDP2 (``is_sharded``) always runs whole: its parameters are gathered by hooks
on the modules' forwards, and a trunk called on its own would skip the root's.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from contextlib import nullcontext

import torch
from torch import nn

from rlhfkit.models.lora import unwrap

_exact: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()  # split_is_exact's answers


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (LLaMA's ``model.model``, GPT-2's ``transformer``), of a
    causal LM or a sequence classifier, under a peft wrapper or not."""
    base = unwrap(model)
    get = getattr(base, "get_decoder", None)
    decoder = get() if get is not None else None
    if isinstance(decoder, nn.Module) and decoder is not base:
        return decoder
    return getattr(base, base.base_model_prefix)


def hidden_size(model: nn.Module) -> int:
    """The width of the trunk's last hidden states, what a head on them takes (GPT-2's config says
    ``n_embd``, multimodal configs keep it in their text config)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return head.in_features
    return base.config.get_text_config().hidden_size


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its trunk's last hidden states (..., d) -> (..., V): the output
    embeddings, then the scaling or soft-capping the family's forward applies (in its op order)."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden)
    cfg = base.config.get_text_config()
    if getattr(cfg, "logit_scale", None) is not None and getattr(base, "logit_scale", None) is not None:
        logits = logits * base.logit_scale  # Cohere
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling  # Granite
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


def split_is_exact(model: nn.Module) -> bool:
    """Whether trunk + ``head_logits`` reproduce ``model(input_ids).logits`` (checked once per model
    on eight tokens in eval mode, without grad; the answer is cached)."""
    base = unwrap(model)
    if base in _exact:
        return _exact[base]
    device = next(base.parameters()).device
    ids = (torch.arange(8, device=device) * 97 % base.get_input_embeddings().num_embeddings).unsqueeze(0)
    modes = {m: m.training for m in base.modules()}
    base.eval()  # LoRA's dropout would make any two forwards differ
    try:
        with torch.no_grad(), _eager():  # in the caller's autocast: the same ops both ways
            whole = base(input_ids=ids, use_cache=False).logits
            split = head_logits(base, trunk(base)(input_ids=ids, use_cache=False).last_hidden_state)
    finally:
        for m, training in modes.items():
            m.training = training
    exact = whole.shape == split.shape and torch.allclose(whole.float(), split.float(), rtol=1e-5, atol=1e-6)
    _exact[base] = exact
    return exact


def _eager():
    """Compiled blocks run their eager forward inside (a probe must not cost a compile of its own);
    where nothing imported torch's compiler, nothing is compiled, and importing it would take seconds."""
    if "torch._dynamo" not in sys.modules:
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the model under its peft wrapper) is sharded by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(unwrap(model), FSDPModule)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, L, k), positions (B, R) -> (B, R, k)."""
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def keeps_logits_tail(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep``: the LM head on the last columns only."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def scored_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk's last hidden states and the model's logits at ``positions`` only:
    input_ids, attention_mask (B, L), positions (B, R) -> hidden (B, R, d), logits (B, R, V).

    Where ``split_is_exact``: one trunk forward, the head on the B·R selected states. Otherwise, and
    for a model sharded by FSDP2, the model's own forward (logits from the first scored column on,
    where it takes ``logits_to_keep``; else at every position) with its last hidden states, then the
    selection.
    ``model`` may be peft-wrapped (its adapters act either way, or not inside ``disable_adapter``).
    """
    if not is_sharded(model) and split_is_exact(model):
        hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = gather_positions(hidden, positions)
        return h, head_logits(model, h)
    base = unwrap(model)
    kw = {}
    if keeps_logits_tail(base):  # the head on the scored tail only
        kw["logits_to_keep"] = input_ids.shape[1] - int(positions.min())
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True, **kw)
    tail = positions - (input_ids.shape[1] - out.logits.shape[1])  # positions among the kept columns
    return gather_positions(out.hidden_states[-1], positions), gather_positions(out.logits, tail)
