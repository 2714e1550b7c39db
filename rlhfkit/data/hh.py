"""The Anthropic HH text format: ``"\\n\\nHuman: …\\n\\nAssistant: …"`` -> chat messages.

An HH transcript is a string of turns, each introduced by ``"\\n\\nHuman:"`` or
``"\\n\\nAssistant:"``. ``parse_hh`` turns it into ``[{"role": "user"|"assistant", "content"}]``:

- leading/trailing whitespace of the text and of every turn is stripped (the first marker may
  come without its ``"\\n\\n"``);
- the text must start with a Human turn, and every turn must have content; the one exception,
  with ``allow_empty_last=True``, is a final ``Assistant:`` turn with nothing after it — in
  preference data that is an answer the model really gave (hh-rlhf harmless prefers the empty
  answer three times in ``train.jsonl``), and for a prompt it is the turn to be written;
- consecutive turns of one role are kept as they are (the real data has them: a model that wrote
  ``"\\n\\nAssistant:"`` inside its own answer).

By convention the last assistant turn is the response: ``split_last_response`` returns
``(prompt messages, response)`` (consecutive final assistant turns are one response).

``shared_prefix`` handles the hh-rlhf pairs whose two transcripts do not diverge only at the last
turn (5 of 2,312 in the harmless split: one model kept writing fake ``Human:``/``Assistant:`` turns
after the point where the two samples split). The shared conversation is the longest common run
of turns ending with a user turn, and each response is everything after it, re-joined in HH text —
what the labeler actually compared.
"""

from __future__ import annotations

import re

from rlhfkit.data.records import Message

_MARKER = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_NAME = {"user": "Human", "assistant": "Assistant"}


class HHFormatError(ValueError):
    """Text that is not a valid HH transcript (the message says why, in one line)."""


def parse_hh(text: str, *, allow_empty_last: bool = False) -> list[Message]:
    """Parse an HH transcript into chat messages (``user``/``assistant``), in order."""
    if not isinstance(text, str):
        raise HHFormatError(f"expected HH text (a string), got {type(text).__name__}")
    body = "\n\n" + text.strip()
    marks = list(_MARKER.finditer(body))
    if not text.strip():
        raise HHFormatError("HH text is empty")
    if not marks or marks[0].start() != 0:
        start = text.strip().split("\n")[0][:30]
        raise HHFormatError(f"HH text must start with 'Human:', starts with {start!r}")
    if marks[0].group(1) != "Human":
        raise HHFormatError("HH text must start with 'Human:', starts with 'Assistant:'")
    messages: list[Message] = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        content = body[m.end() : end].strip()
        role = _ROLE[m.group(1)]
        last = i + 1 == len(marks)
        if not content and not (last and allow_empty_last and role == "assistant"):
            if last and role == "assistant":
                raise HHFormatError(f"the last Assistant turn (turn {i + 1}, the response) is empty")
            raise HHFormatError(f"turn {i + 1} ({m.group(1)}) is empty")
        messages.append({"role": role, "content": content})
    return messages


def split_last_response(messages: list[Message]) -> tuple[list[Message], str]:
    """``(prompt, response)``: everything after the last user turn is the response.

    Normally that is the one final assistant turn. Where a model wrote ``"\n\nAssistant:"`` inside
    its answer (consecutive assistant turns), the response is all of them, re-joined in HH text.
    """
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0 or last_user == len(messages) - 1:
        raise HHFormatError("expected the conversation to end with an Assistant turn (the response)")
    return messages[: last_user + 1], join_turns(messages[last_user + 1 :])


def to_hh(messages: list[Message]) -> str:
    """The HH text of ``messages`` (inverse of ``parse_hh`` for stripped contents)."""
    return "".join(f"\n\n{_NAME.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def shared_prefix(a: list[Message], b: list[Message]) -> tuple[list[Message], str, str]:
    """Split two conversations of one pair into ``(shared prompt, response_a, response_b)``.

    The usual case: both end with an assistant turn and agree on everything before it. Otherwise
    the prompt is the longest common run of turns that ends with a user turn and is followed by an
    assistant turn in both; each response is the rest of its conversation (its first assistant
    turn, then any later turns in HH text). Raises ``HHFormatError`` when no such prefix exists.
    """
    if a[-1]["role"] == "assistant" and b[-1]["role"] == "assistant" and a[:-1] == b[:-1] and len(a) >= 2:
        return a[:-1], a[-1]["content"], b[-1]["content"]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    for j in range(min(common, len(a) - 1, len(b) - 1), 0, -1):
        if a[j - 1]["role"] == "user" and a[j]["role"] == "assistant" and b[j]["role"] == "assistant":
            return a[:j], join_turns(a[j:]), join_turns(b[j:])
    raise HHFormatError(f"the two conversations do not share a prompt (they differ from turn {common + 1})")


def join_turns(turns: list[Message]) -> str:
    """The first turn's content, then the later turns in HH text (a response that ran on)."""
    return turns[0]["content"] + to_hh(turns[1:])
