"""Rule-based revision of a demonstration: the labeler's best answer, edited where an edit that
anyone could make by hand satisfies an instruction the answer missed.

Best-of-K rejection sampling can only teach what the base model already does now and then, and
a 135M model asked to "answer in lowercase" or to "end with the phrase …" almost never does (in
the K = 6 base-model samples of one demo run: 0 of 84 answers in lowercase when asked, 12 % with the asked end phrase). People
writing demonstrations would fix those answers before handing them in — the critique-and-revise
step of Constitutional AI (Bai et al. 2022, "SL-CAI"), done here by rules, because the rules of
the task are verifiable. Without it neither the SFT model nor the reward model ever sees such an
answer, and PPO has nothing to reinforce.

The edits (each a small pure function, ``text -> text``):

- ``finish``        an answer cut off at the length limit (or visibly mid-sentence) is cut back to
                    its last complete sentence, if at least ``MIN_KEPT_WORDS`` words remain;
- ``start_phrase``  the phrase is put in front;
- ``postscript``    a short postscript line ``P.S. I hope this helps!`` (with the asked marker);
- ``end_phrase``    the phrase is appended as the last sentence (after a postscript);
- ``no_commas``     commas are dropped;
- ``quotation``     the whole answer is wrapped in double quotation marks;
- ``lowercase`` / ``uppercase``  the letter case of the whole answer.

:func:`revise` applies them in that order, each only when its instruction fails, and keeps an
edit only if the gold score rises (so an edit that breaks another instruction is dropped). The
other instruction kinds (word counts, keywords, JSON, sections …) need rewriting, not editing,
and are left to the model.

:func:`with_revisions` puts revised answers beside their originals in what the labeler ranks, so
the reward model learns the same contrasts (the pipeline's ``rank_revisions``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from rlhfkit.data.records import Prompt
from rlhfkit.feedback import rubric

MIN_KEPT_WORDS = 12
"""``finish`` keeps a cut-off answer only if its complete sentences hold at least this many words."""

POSTSCRIPT_TEXT = "I hope this helps!"


def finish(text: str) -> str:
    """Cut ``text`` back to the end of its last complete sentence ("" when nothing is left)."""
    ends = [m.end() for m in rubric._SENT_END_RE.finditer(text)]
    if not ends:
        return ""
    kept = text[: ends[-1]].rstrip()
    return kept if len(rubric.words(kept)) >= MIN_KEPT_WORDS else ""


def add_start_phrase(text: str, phrase: str) -> str:
    return f"{phrase.strip()} {text.lstrip()}"


def add_end_phrase(text: str, phrase: str) -> str:
    text = text.rstrip()
    sep = "\n\n" if "\n" in text else " "
    return f"{text}{sep}{phrase.strip()}"


def add_postscript(text: str, marker: str = "P.S.") -> str:
    return f"{text.rstrip()}\n\n{marker} {POSTSCRIPT_TEXT}"


def drop_commas(text: str) -> str:
    """"1,000" -> "1000", "rice, beans" -> "rice beans", a comma before a line end goes."""
    text = re.sub(r"(?<=\d)[,，](?=\d)", "", text)
    text = re.sub(r"[ \t]*[,，][ \t]*(?=\S)", " ", text)
    return re.sub(r"[ \t]*[,，][ \t]*", "", text)


def quote(text: str) -> str:
    return f'"{rubric._strip_quotes(text)}"'


# kind -> edit(text, **instruction params); applied in this order
EDITS: dict[str, Callable[..., str]] = {
    "start_phrase": add_start_phrase,
    "postscript": add_postscript,
    "end_phrase": add_end_phrase,
    "no_commas": drop_commas,
    "quotation": quote,
    "lowercase": str.lower,
    "uppercase": str.upper,
}


@dataclass
class Revision:
    text: str
    finished: bool
    edits: list[str] = field(default_factory=list)  # what was changed, in order
    gold_before: float = 0.0
    gold_after: float = 0.0


def revise(prompt: Prompt, response: str, finished: bool = True) -> Revision:
    """Edit ``response`` towards the instructions of ``prompt``; see the module docstring."""
    text, done = response, finished
    before = best = rubric.score(prompt, text, done).total
    edits: list[str] = []
    if not done or rubric.looks_unfinished(text):
        cut = finish(text)
        got = rubric.score(prompt, cut, True).total if cut else best
        if got > best:
            text, done, best = cut, True, got
            edits.append("finish")
    specs = {s["kind"]: s for s in rubric.instructions_of(prompt)}  # EDITS sets the order, not the prompt
    for kind, edit in EDITS.items():
        spec = specs.get(kind)
        if spec is None or rubric.check_instruction(spec, text):
            continue
        candidate = edit(text, **{k: v for k, v in spec.items() if k != "kind"})
        got = rubric.score(prompt, candidate, done).total
        if got > best:
            text, best = candidate, got
            edits.append(kind)
    return Revision(text=text, finished=done, edits=edits, gold_before=before, gold_after=best)


def with_revisions(prompt: Prompt, responses: list[str], finished: list[bool], max_k: int = 9
                   ) -> tuple[list[str], list[bool], list[int | None]]:
    """The K sampled answers plus rule-revised versions of some of them, for the labeler to rank.

    The reward model can only learn what its rankings contrast. A 135M policy almost never
    answers in lowercase or ends with the asked phrase, so no sampled ranking shows such an
    answer, and the RM cannot tell PPO that it would be better. A revised answer beside its
    original (the same text, the instruction now met) is the cleanest contrast there is — the
    "labeler edits the answer" step of data collection (compare the human-edited demonstrations
    of InstructGPT and the revisions of Constitutional AI). The labeler still ranks all of them.

    Returns ``(responses, finished, revised_from)``: the K originals first, then up to
    ``max_k - K`` revisions, largest gold gain first (distinct texts only, none already sampled);
    ``revised_from[i]`` is the index of the original that response i revises (``None`` for samples).
    """
    seen = {r.strip() for r in responses}
    found: list[tuple[float, int, Revision]] = []
    for i, (r, f) in enumerate(zip(responses, finished)):
        rv = revise(prompt, r, f)
        if rv.edits and rv.text.strip() not in seen:
            seen.add(rv.text.strip())
            found.append((rv.gold_after - rv.gold_before, i, rv))
    found.sort(key=lambda t: (-t[0], t[1]))
    extra = found[: max(0, max_k - len(responses))]
    return ([*responses, *(rv.text for _, _, rv in extra)], [*finished, *(rv.finished for _, _, rv in extra)],
            [*([None] * len(responses)), *(i for _, i, _ in extra)])
