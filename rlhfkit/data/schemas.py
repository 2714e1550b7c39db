"""One row (a dict) -> records of a kind: the schemas the loaders recognise.

Schemas (recognised per record, in this order; null or "" counts as absent when telling them apart)
------------------------------------------------------------------------------------------------------
A *prompt* is a string (one user turn), a list of chat messages ending with a user turn, or HH
text (a string starting with ``Human:``; a final empty ``Assistant:`` turn is dropped, and the
responses that continue it — ``" I think…"`` — are stripped, as every HH turn is). Messages
are ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``); roles ``system`` (first turn only),
``user`` (alias ``human``), ``assistant`` (aliases ``gpt``, ``bot``, ``model``); every content a
non-empty string, at least one user turn.

demonstration
  1. ``{instruction, instances: [{input, output}, …]}`` (self-instruct seeds) -> one Demonstration
     per instance; prompt = instruction + ("\\n\\n" + input, if input is not empty)
  2. ``{messages: [… , {"role": "assistant", …}]}`` -> the last (assistant) turn is the response
  3. ``{prompt | messages, response}``
  4. ``{instruction, input?, output}`` (Alpaca) -> prompt as in 1.
  5. ``{chosen}`` or ``{text}``: an HH transcript (or a message list); the last assistant turn is
     the response (of a preference pair, the chosen conversation is the demonstration)
ranking
  1. ``{prompt | messages, responses: [best, …, worst], ranks?}`` — ``ranks[i]`` is the rank of
     ``responses[i]``, lower is better, equal = tied; responses are re-ordered best first and ranks
     renumbered 0, 1, 2 … (dense); lists in the row's ``meta`` object with one entry per response
     (the gold scores our labelers write) are re-ordered with them. All tied (no pair) is invalid.
     A response may be "" (a model that answered nothing gave a real answer, ranked like any other).
  2. ``{prompt | messages, chosen, rejected}`` -> K = 2
  3. ``{chosen, rejected}`` as two full conversations (HH transcripts, or message lists) sharing a
     prompt -> messages = the shared conversation, responses = the two final assistant turns.
     In HH text an empty final ``Assistant:`` turn is a real (empty) answer. Where the two
     transcripts diverge before their last turn (5 pairs in hh-rlhf harmless) the prompt is the
     longest shared run of turns ending with a user turn and each response is the rest of its
     transcript (see ``hh.shared_prefix``); if they share no such prefix the record is invalid.
prompt
  1. ``{prompt | messages}`` (a trailing assistant turn of ``messages`` is dropped)
  2. ``{instruction, input?}``, or self-instruct ``{instruction, instances}`` (one per instance)
  3. ``{chosen, rejected}``: the shared prompt of the pair, as for rankings
  4. ``{chosen}`` or ``{text}``: HH text; all turns but the last assistant turn
text
  ``.txt`` files, or records with a non-empty ``text`` string.

``parse_record(row, kind, fields=...)`` raises ``InvalidRecord`` (a message without location);
``rlhfkit.data.loaders`` adds the file and line.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from rlhfkit.data.hh import HHFormatError, parse_hh, shared_prefix, split_last_response
from rlhfkit.data.jsonl import json_error
from rlhfkit.data.records import ROLES, Demonstration, Message, Prompt, Ranking

Kind = Literal["demonstration", "ranking", "prompt", "text"]
FIELDS = ("prompt", "messages", "response", "responses", "ranks", "chosen", "rejected",
          "instruction", "input", "output", "instances", "text")  # fmt: skip
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class InvalidRecord(ValueError):
    """One record does not fit its kind; the message (without location) says which field and why."""


def parse_record(row: dict[str, Any], kind: Kind, *, fields: dict[str, str] | None = None) -> list[Any]:
    """The records of one row (most rows give one; a self-instruct task gives one per instance).

    Raises ``InvalidRecord`` (message without location) when the row fits no schema of ``kind``.
    """
    r = _Row(row, fields or {})
    if kind == "demonstration":
        out = _demonstrations(r)
    elif kind == "ranking":
        ranking, order = _ranking(r)
        out = [ranking]
    elif kind == "prompt":
        out = _prompts(r)
    elif kind == "text":
        if not r.present("text"):
            raise r.unknown("text")
        return [r.text("text")]
    else:
        raise InvalidRecord(f"unknown record kind {kind!r}")
    meta = r.meta()
    if kind == "ranking":
        meta = _per_response_reordered(meta, order)
    for rec in out:
        rec.meta = {**meta, **rec.meta}
    return out


def _per_response_reordered(meta: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """``meta`` with every list of one entry per response (our rankings' ``gold`` scores, ...)
    put in the order the responses were re-ordered to, so entry i still describes response i.
    (Values are not renumbered: ``revised_from`` keeps naming positions of the original row.)"""
    k = len(order)
    if order == list(range(k)):
        return meta
    return {key: [v[i] for i in order] if isinstance(v, list) and len(v) == k else v for key, v in meta.items()}


class _Row:
    """A raw row seen through the field mapping; remembers which columns were used."""

    def __init__(self, raw: dict[str, Any], fields: dict[str, str]):
        self.raw, self.fields, self.used = raw, fields, set()
        for ours, col in fields.items():
            if self._lookup(col)[0] is False:
                raise InvalidRecord(f"missing field {col!r} (mapped to {ours!r})")

    def _lookup(self, col: str) -> tuple[bool, Any]:
        if col in self.raw:
            return True, self.raw[col]
        node: Any = self.raw
        for part in col.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def name(self, key: str) -> str:
        return self.fields.get(key, key)

    def _find(self, key: str) -> tuple[bool, Any]:
        if key not in self.fields and key in self.fields.values():
            return False, None  # the user's column of that name was mapped to another of our fields
        return self._lookup(self.name(key))

    def has(self, key: str) -> bool:
        """Present and not null or "" (datasets fill absent columns with None, CSV with "")."""
        found, value = self._find(key)
        return found and value is not None and value != ""

    def present(self, key: str) -> bool:
        return self._find(key)[0]

    def get(self, key: str) -> Any:
        found, value = self._find(key)
        if not found:
            raise InvalidRecord(f"missing field {self.name(key)!r}")
        self.used.add(self.name(key).split(".")[0])
        return value

    def text(self, key: str, *, allow_empty: bool = False, value: Any = None, label: str | None = None) -> str:
        v = self.get(key) if label is None else value
        label = label or self.name(key)
        if not isinstance(v, str) or (not allow_empty and not v.strip()):
            expected = "a string" if allow_empty else "a non-empty string"
            raise InvalidRecord(f"field {label!r}: expected {expected}, got {describe_value(v)}")
        return v

    def list(self, key: str, value: Any = None, label: str | None = None) -> list[Any]:
        v = self.get(key) if label is None else value
        label = label or self.name(key)
        if isinstance(v, str) and v.lstrip().startswith("["):  # a list in a CSV cell
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise InvalidRecord(f"field {label!r}: {json_error(e)}") from None
        if not isinstance(v, list) or not v:
            raise InvalidRecord(f"field {label!r}: expected a non-empty list, got {describe_value(v)}")
        return v

    def unknown(self, expected: str) -> InvalidRecord:
        found = ", ".join(k for k, v in self.raw.items() if v is not None) or "nothing"
        return InvalidRecord(f"cannot tell the record type: expected fields {expected} (found: {found})")

    def meta(self) -> dict[str, Any]:
        """Unused scalar columns, plus the contents of a ``meta`` object column (what our own
        rankings carry: the labeler, gold scores, ...), so nothing a record says is dropped."""
        out = {k: v for k, v in self.raw.items() if k not in self.used and isinstance(v, (str, int, float, bool))}
        nested = self.raw.get("meta")
        if "meta" not in self.used and isinstance(nested, dict):
            out = {**nested, **out}
        return out


# -- prompts and messages


def _messages(r: _Row, key: str) -> list[Message]:
    """A validated message list (roles, non-empty contents, system only first)."""
    label = r.name(key)
    items = r.list(key)
    out: list[Message] = []
    for i, m in enumerate(items):
        where = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise InvalidRecord(
                f"field {where!r}: expected a message object {{role, content}}, got {describe_value(m)}"
            )
        rk, ck = ("role", "content") if "role" in m or "from" not in m else ("from", "value")
        if rk not in m:
            raise InvalidRecord(f"field {where!r}: missing 'role'")
        role = m[rk]
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise InvalidRecord(
                f"field '{where}.{rk}': expected one of {', '.join(ROLES)}, got {describe_value(m[rk])}"
            )
        if role == "system" and i > 0:
            raise InvalidRecord(f"field '{where}.{rk}': a system turn may only come first")
        content = m.get(ck)
        if not isinstance(content, str) or not content.strip():
            raise InvalidRecord(f"field '{where}.{ck}': expected a non-empty string, got {describe_value(content)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRecord(f"field {label!r}: expected at least one user turn")
    return out


def _ends_with_user(msgs: list[Message], label: str) -> list[Message]:
    if msgs[-1]["role"] != "user":
        raise InvalidRecord(f"field {label!r}: expected the prompt to end with a user turn, got {msgs[-1]['role']!r}")
    return msgs


def _hh(r: _Row, key: str, *, allow_empty_last: bool) -> list[Message]:
    text = r.text(key, allow_empty=False)
    try:
        return parse_hh(text, allow_empty_last=allow_empty_last)
    except HHFormatError as e:
        raise InvalidRecord(f"field {r.name(key)!r}: {e}") from None


def _is_hh(v: Any) -> bool:
    return isinstance(v, str) and v.lstrip().startswith("Human:")


def _prompt(r: _Row, key: str, *, drop_answer: bool = False) -> list[Message]:
    """A prompt field: a string, HH text, or messages (ending with a user turn)."""
    label = r.name(key)
    v = r.get(key)
    if isinstance(v, str) and not _is_hh(v):
        return [{"role": "user", "content": r.text(key)}]
    if isinstance(v, str):
        msgs = _hh(r, key, allow_empty_last=True)
        if msgs[-1]["role"] == "assistant" and (drop_answer or not msgs[-1]["content"]):
            msgs = msgs[:-1]
        return _ends_with_user(msgs, label)
    if not isinstance(v, list):
        raise InvalidRecord(f"field {label!r}: expected a string or a list of messages, got {describe_value(v)}")
    msgs = _messages(r, key)
    if drop_answer and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return _ends_with_user(msgs, label)


def _hh_strip(r: _Row, prompt_key: str, response: str) -> str:
    """After an HH prompt ("…\n\nAssistant:") a response is a continuation (" I think…"): strip it,
    as ``parse_hh`` strips every turn."""
    return response.strip() if _is_hh(r.get(prompt_key)) else response


def _prompt_key(r: _Row) -> str:
    return "prompt" if r.has("prompt") or not r.has("messages") else "messages"


def _instruction_prompt(instruction: str, inp: Any, label: str) -> list[Message]:
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise InvalidRecord(f"field {label!r}: expected a string, got {describe_value(inp)}")
    text = instruction.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
    return [{"role": "user", "content": text}]


def _instances(r: _Row) -> list[tuple[list[Message], Any, int]]:
    """Self-instruct: (prompt, output value, index) per instance."""
    instruction = r.text("instruction")
    label = r.name("instances")
    out = []
    for i, inst in enumerate(r.list("instances")):
        if not isinstance(inst, dict):
            raise InvalidRecord(
                f"field '{label}[{i}]': expected an object {{input, output}}, got {describe_value(inst)}"
            )
        out.append((_instruction_prompt(instruction, inst.get("input"), f"{label}[{i}].input"), inst.get("output"), i))
    return out


def _conversation(r: _Row, key: str, *, allow_empty_last: bool) -> list[Message]:
    """A full conversation given as HH text or as a message list."""
    v = r.get(key)
    if isinstance(v, list) or (isinstance(v, str) and v.lstrip().startswith("[")):
        return _messages(r, key)
    return _hh(r, key, allow_empty_last=allow_empty_last)


def _split_conversation(r: _Row, key: str, *, allow_empty_last: bool) -> tuple[list[Message], str]:
    """(prompt, response) of a full conversation; in HH text, everything after the last user turn."""
    msgs = _conversation(r, key, allow_empty_last=allow_empty_last)
    if isinstance(r.get(key), str) and _is_hh(r.get(key)):
        try:
            return split_last_response(msgs)
        except HHFormatError as e:
            raise InvalidRecord(f"field {r.name(key)!r}: {e}") from None
    return _last_answer(msgs, r.name(key))


def _last_answer(msgs: list[Message], label: str) -> tuple[list[Message], str]:
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise InvalidRecord(f"field {label!r}: expected the conversation to end with an assistant turn (the response)")
    return _ends_with_user(msgs[:-1], label), msgs[-1]["content"]


# -- kinds

_DEMO_SCHEMAS = (
    "instruction+instances, messages, prompt+response, instruction+output, chosen (HH text) or text (HH text)"
)
_RANK_SCHEMAS = "prompt+responses, prompt+chosen+rejected, or chosen+rejected (HH text)"
_PROMPT_SCHEMAS = "prompt, messages, instruction, chosen (HH text) or text (HH text)"


def _demonstrations(r: _Row) -> list[Demonstration]:
    for has in (r.has, r.present):  # non-null fields first; then a null one gets its own message
        if has("instances"):
            demos = []
            for prompt, output, i in _instances(r):
                out = r.text("output", value=output, label=f"{r.name('instances')}[{i}].output")
                demos.append(Demonstration(messages=prompt, response=out, meta={"instance": i}))
            return demos
        if has("messages") and not r.has("response"):
            msgs = _messages(r, "messages")
            if msgs[-1]["role"] == "user" and r.present("response"):
                r.text("response")  # the response is there but null: say so
            msgs, resp = _last_answer(msgs, r.name("messages"))
            return [Demonstration(messages=msgs, response=resp)]
        if (has("prompt") or has("messages")) and has("response"):
            key = _prompt_key(r)
            return [Demonstration(messages=_prompt(r, key), response=_hh_strip(r, key, r.text("response")))]
        if has("instruction") and has("output"):
            prompt = _instruction_prompt(
                r.text("instruction"), r.get("input") if r.has("input") else "", r.name("input")
            )
            return [Demonstration(messages=prompt, response=r.text("output"))]
        for key in ("chosen", "text"):
            if has(key):
                msgs, resp = _split_conversation(r, key, allow_empty_last=False)
                if key == "chosen" and r.present("rejected"):
                    r.get("rejected")  # the other half of the pair: not kept in meta
                return [Demonstration(messages=msgs, response=resp)]
    raise r.unknown(_DEMO_SCHEMAS)


def _ranking(r: _Row) -> tuple[Ranking, list[int]]:
    """The ranking, and ``order``: its i-th response is the row's ``order[i]``-th (best first)."""
    for has in (r.has, r.present):
        if has("responses"):
            msgs = _prompt(r, _prompt_key(r))
            label = r.name("responses")
            items = r.list("responses")
            responses = [
                _hh_strip(r, _prompt_key(r), r.text("", value=v, label=f"{label}[{i}]", allow_empty=True))
                for i, v in enumerate(items)
            ]
            if len(responses) < 2:
                raise InvalidRecord(f"field {label!r}: expected at least 2 responses, got {len(responses)}")
            ranks = _ranks(r, len(responses)) if r.has("ranks") else list(range(len(responses)))
            order = sorted(range(len(responses)), key=lambda i: ranks[i])
            dense = {v: i for i, v in enumerate(sorted(set(ranks)))}
            return Ranking(
                messages=msgs, responses=[responses[i] for i in order], ranks=[dense[ranks[i]] for i in order]
            ), order
        if has("chosen") and has("rejected"):
            if has("prompt") or has("messages"):
                msgs = _prompt(r, _prompt_key(r))
                key = _prompt_key(r)
                return Ranking.from_pair(
                    msgs, _hh_strip(r, key, _answer(r, "chosen")), _hh_strip(r, key, _answer(r, "rejected"))
                ), [0, 1]
            a = _conversation(r, "chosen", allow_empty_last=True)
            b = _conversation(r, "rejected", allow_empty_last=True)
            try:
                msgs, chosen, rejected = shared_prefix(a, b)
            except HHFormatError as e:
                raise InvalidRecord(f"fields {r.name('chosen')!r}/{r.name('rejected')!r}: {e}") from None
            _ends_with_user(msgs, r.name("chosen"))
            return Ranking.from_pair(msgs, chosen, rejected), [0, 1]
    raise r.unknown(_RANK_SCHEMAS)


def _answer(r: _Row, key: str) -> str:
    """An explicit response: a string, or (TRL conversational) one assistant message."""
    v = r.get(key)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        return r.text(key, value=v[0].get("content"), label=f"{r.name(key)}[0].content")
    return r.text(key)


def _ranks(r: _Row, k: int) -> list[int]:
    label = r.name("ranks")
    ranks = r.list("ranks")
    if len(ranks) != k or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranks):
        raise InvalidRecord(f"field {label!r}: expected {k} integers (one rank per response), got {ranks!r}"[:300])
    if len(set(ranks)) == 1:
        raise InvalidRecord(f"field {label!r}: all responses are tied, so there is no pair to learn from")
    return ranks


def _prompts(r: _Row) -> list[Prompt]:
    for has in (r.has, r.present):
        if has("prompt") or has("messages"):
            return [Prompt(messages=_prompt(r, _prompt_key(r), drop_answer=True))]
        if has("instruction"):
            if r.has("instances"):
                return [Prompt(messages=p, meta={"instance": i}) for p, _, i in _instances(r)]
            inp = r.get("input") if r.has("input") else ""
            return [Prompt(messages=_instruction_prompt(r.text("instruction"), inp, r.name("input")))]
        if has("chosen") and has("rejected"):
            return [Prompt(messages=_ranking(r)[0].messages)]
        for key in ("chosen", "text"):
            if has(key):
                msgs = _conversation(r, key, allow_empty_last=True)
                if msgs[-1]["role"] == "assistant":
                    msgs = _split_conversation(r, key, allow_empty_last=True)[0]
                return [Prompt(messages=_ends_with_user(msgs, r.name(key)))]
    raise r.unknown(_PROMPT_SCHEMAS)


def describe_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if not v.strip():
            return "an empty string" if not v else "a blank string"
        return f"{v[:30]!r}" + ("…" if len(v) > 30 else "")
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, list):
        return "an empty list" if not v else "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
