"""ILQL's heads on an LM trunk (the math in ``algos/ilql.py``), and how they are saved beside the LM.

    heads = ILQLHeads(hidden_size(model), vocab)      # Q1, Q2, their Polyak targets, V
    q1, q2 = heads.q(hidden, embedding)               # (..., V) each
    save_ilql_heads(heads, model_dir, beta=1.0)       # ilql_heads.safetensors + ilql.json
    heads, beta = load_ilql_heads(model_dir)          # None where the directory has none

The shape of a Q head, and why: a head hidden -> vocabulary as a plain Linear has d·V weights
(SmolLM2-135M: 576 × 49,152 = 28.3M), and ILQL needs four (Q1, Q2 and their targets) plus Adam's
two moments for the two trained ones: 8 × 28.3M = 226M floats, more than the 135M model itself
(TRLX's 2-layer MLP d -> 2d -> V is twice that). Ours reuses the LM's output embedding E (V × d)
as the token basis, *detached* (the Q losses never move the LM's embedding), and learns a small
MLP g: d -> d -> d in front of it plus a per-token bias b:

    Q_i(s, a) = E[a] · g_i(h_s) + b_i[a]

2d² + 2d + V parameters per head (0.71M on SmolLM2-135M; 2.8M for all four). The MLP's last
layer and the bias start at zero, so Q ≡ 0 and V ≡ 0 at the start: an untrained ILQL model
generates exactly as its LM. V is an MLP d -> d -> 1 (last layer zero too).

A saved ILQL model is a plain Hugging Face causal-LM directory (any tool loads the LM) plus
``ilql_heads.safetensors`` (every head, targets included) and ``ilql.json`` (β of generation, the
sizes). ``rlhfkit.rollout.make_generator`` sees them and generates with ``log π + β (Q̂ − V)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlhfkit.errors import UserError

HEADS_FILE = "ilql_heads.safetensors"
META_FILE = "ilql.json"


class QHead(nn.Module):
    """Q(s, ·) = E · g(h_s) + b over the vocabulary, E the LM's output embedding (detached)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """h (..., d), embedding (V, d) -> Q (..., V)."""
        return nn.functional.linear(self.mlp(h), embedding.detach(), self.bias)

    def taken(self, h: torch.Tensor, embedding: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a) of one token per state without the (..., V) product: h (N, d), actions (N,) -> (N,)."""
        return (self.mlp(h) * embedding.detach()[actions]).sum(-1) + self.bias[actions]


class ILQLHeads(nn.Module):
    """Q1, Q2, their targets (no gradient; ``algos.ilql.polyak_update`` moves them) and V."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab
        self.q1, self.q2 = QHead(hidden, vocab), QHead(hidden, vocab)
        self.target_q1, self.target_q2 = QHead(hidden, vocab), QHead(hidden, vocab)
        self.target_q1.load_state_dict(self.q1.state_dict())
        self.target_q2.load_state_dict(self.q2.state_dict())
        self.target_q1.requires_grad_(False)
        self.target_q2.requires_grad_(False)
        self.v = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.v[2].weight)
        nn.init.zeros_(self.v[2].bias)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """V(s): h (..., d) -> (...,)."""
        return self.v(h)[..., 0]

    def target_q(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Q̂(s, ·) = min(Q̄1, Q̄2) over the vocabulary, what the policy uses: h (..., d) -> (..., V)."""
        return torch.minimum(self.target_q1(h, embedding), self.target_q2(h, embedding))


def save_ilql_heads(heads: ILQLHeads, path: str | Path, beta: float) -> None:
    """``ilql_heads.safetensors`` and ``ilql.json`` (β of generation, sizes) into model directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(path / HEADS_FILE))
    meta = {"beta": beta, "hidden_size": heads.hidden, "vocab_size": heads.vocab, "policy": "log pi + beta (Q - V)"}
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def has_ilql_heads(path: str | Path | None) -> bool:
    return bool(path) and (Path(path) / META_FILE).is_file() and (Path(path) / HEADS_FILE).is_file()


def load_ilql_heads(path: str | Path) -> tuple[ILQLHeads, float] | None:
    """The heads and β saved in model directory ``path``; None where it has none."""
    from safetensors.torch import load_file

    if not has_ilql_heads(path):
        return None
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        heads = ILQLHeads(int(meta["hidden_size"]), int(meta["vocab_size"]))
        heads.load_state_dict(load_file(str(path / HEADS_FILE)))
        beta = float(meta["beta"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: broken ILQL heads ({META_FILE}, {HEADS_FILE}): {str(e).splitlines()[0]}") from None
    return heads.requires_grad_(False).eval(), beta
