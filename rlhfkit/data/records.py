"""Record types: the four shapes of data RLHF needs.

- ``Prompt``: what a policy answers (a string or chat messages).
- ``Demonstration``: a prompt and a good response, for SFT.
- ``Ranking``: a prompt and K >= 2 responses ordered best -> worst, ties allowed, for the RM.
- ``Pair``: chosen/rejected, which is a Ranking with K = 2 (``Ranking.from_pair``).

A prompt is always stored as chat ``messages`` (``[{"role": "user", "content": ...}, ...]``);
a plain string prompt becomes one user message. The response is the text of the next
assistant turn. Chat templates come from the tokenizer (see ``rlhfkit.data.tokenize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}

ROLES = ("system", "user", "assistant")


def as_messages(prompt: str | list[Message]) -> list[Message]:
    """A prompt string becomes one user turn; a message list is returned as a list of dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


@dataclass
class Prompt:
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. instruction specs of the built-in task

    @property
    def text(self) -> str:
        """The last user turn (what a person would call 'the prompt')."""
        return self.messages[-1]["content"]


@dataclass
class Demonstration:
    messages: list[Message]  # the prompt, as chat turns ending with a user turn
    response: str  # the next assistant turn
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ranking:
    """A prompt and K >= 2 responses, best first.

    ``ranks[i]`` is the rank of ``responses[i]`` (0 = best); equal ranks are ties. When
    ``ranks`` is omitted the responses are taken as strictly ordered best -> worst.
    """

    messages: list[Message]
    responses: list[str]
    ranks: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ranks is None:
            self.ranks = list(range(len(self.responses)))
        if len(self.responses) < 2:
            raise ValueError(f"a ranking needs K >= 2 responses, got {len(self.responses)}")
        if len(self.ranks) != len(self.responses):
            raise ValueError(f"{len(self.ranks)} ranks for {len(self.responses)} responses")

    @property
    def k(self) -> int:
        return len(self.responses)

    @classmethod
    def from_pair(cls, messages: list[Message], chosen: str, rejected: str, **meta: Any) -> Ranking:
        return cls(messages=messages, responses=[chosen, rejected], ranks=[0, 1], meta=dict(meta))

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs; tied responses make no pair."""
        out = []
        for i in range(self.k):
            for j in range(self.k):
                if self.ranks[i] < self.ranks[j]:
                    out.append((i, j))
        return out


def ranking_row(prompt: Prompt, rk: Ranking, **meta: Any) -> dict[str, Any]:
    """A labeler's ranking of ``prompt``'s answers as one line of a rankings file (JSONL, the
    loaders' ranking format; extra ``meta`` merged into the ranking's own)."""
    return {"prompt": prompt.text, "responses": rk.responses, "ranks": rk.ranks, "meta": {**rk.meta, **meta}}


Pair = Ranking  # a Pair is a Ranking with K = 2: Ranking.from_pair(messages, chosen, rejected)
