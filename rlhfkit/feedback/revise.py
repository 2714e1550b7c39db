"""Rule-based revision of a demonstration: the labeler's best answer, edited where an edit that
anyone could make by hand satisfies an instruction the answer missed.

Best-of-K rejection sampling can only teach what the base model already does now and then, and
a 135M model asked to "answer in lowercase" or to "end with the phrase …" almost never does (in
the K = 6 base-model samples of one demo run: 0 of 84 answers in lowercase when asked, 12 % with
the asked end phrase). People writing demonstrations would fix those answers before handing them
in — the critique-and-revise step of Constitutional AI (Bai et al. 2022, "SL-CAI"), done here by
rules, because the rules of the task are verifiable. Without it neither the SFT model nor the
reward model ever sees such an answer, and PPO has nothing to reinforce.

The edits (each a small pure function, ``text -> text``):

- ``finish``        an answer cut off at the length limit (or visibly mid-sentence) is cut back to
                    its last complete sentence, if at least ``MIN_KEPT_WORDS`` words remain;
- ``word_count`` / ``sentence_count`` (at most / exactly n)  the answer is cut back to its first
                    sentences, as many as fit;
- ``forbidden_words``  each forbidden word is deleted;
- ``paragraph_count`` / ``line_count`` / ``numbered_sections`` / ``bullet_count`` (n)  the
                    sentences are regrouped into n paragraphs, lines, ``Section i`` blocks or
                    ``* `` bullets (as evenly as they go; needs at least n sentences);
- ``include_keywords``  a closing sentence names the missing keywords;
- ``title``         a ``<<title>>`` line (the answer's first words) is put in front;
- ``highlights``    the first n words of four letters or more are marked ``*like this*``;
- ``placeholders``  a line of ``[name]``-style placeholders is appended;
- ``start_phrase``  the phrase is put in front;
- ``postscript``    a short postscript line ``P.S. I hope this helps!`` (with the asked marker);
- ``end_phrase``    the phrase is appended as the last sentence (after a postscript);
- ``no_commas``     commas are dropped;
- ``json_format``   the answer becomes the string value of ``{"answer": …}``;
- ``quotation``     the whole answer is wrapped in double quotation marks;
- ``lowercase`` / ``uppercase``  the letter case of the whole answer.

:func:`revise` applies them in that order, each only when its instruction fails, and keeps an
edit only if the gold score rises (so an edit that breaks another instruction is dropped). An
edit that cannot apply (too few sentences to regroup, no sentence short enough) returns the text
unchanged. ``keyword_frequency`` and the "at least" counts need writing, not editing, and are
left to the model. The edits are crude on purpose — a person would write better — but each
changes only what its instruction is about, which is what a reward model must learn to see.

:func:`with_revisions` puts revised answers beside their originals in what the labeler ranks, so
the reward model learns the same contrasts (the pipeline's ``rank_revisions``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """ "1,000" -> "1000", "rice, beans" -> "rice beans", a comma before a line end goes."""
    text = re.sub(r"(?<=\d)[,，](?=\d)", "", text)
    text = re.sub(r"[ \t]*[,，][ \t]*(?=\S)", " ", text)
    return re.sub(r"[ \t]*[,，][ \t]*", "", text)


def quote(text: str) -> str:
    return f'"{rubric._strip_quotes(text)}"'


def keep_first_sentences(text: str, relation: str, n: int, unit: str) -> str:
    """The longest run of leading sentences whose count of ``unit`` ("words" or "sentences")
    is at most ``n`` (``relation`` at_most) or exactly ``n`` (exactly); ``text`` unchanged when
    no such run exists or for ``at_least``."""
    if relation == "at_least":
        return text
    sents = rubric.sentences(text)
    count = (lambda t: len(rubric.words(t))) if unit == "words" else (lambda t: len(rubric.sentences(t)))
    for j in range(len(sents), 0, -1):
        kept = " ".join(sents[:j])
        c = count(kept)
        if c <= n and (relation == "at_most" or c == n):
            return kept
    return text


def cut_words(text: str, relation: str, n: int) -> str:
    return keep_first_sentences(text, relation, n, "words")


def cut_sentences(text: str, relation: str, n: int) -> str:
    return keep_first_sentences(text, relation, n, "sentences")


def delete_words(text: str, words: list[str]) -> str:
    """Every whole-word, any-case occurrence of each word deleted (and the spaces tidied)."""
    for w in words:
        text = re.sub(rf"(?i)(?<![^\W_]){re.escape(w.strip())}(?![^\W_])", "", text)
    return re.sub(r"[ \t]{2,}", " ", re.sub(r" +([.,;:!?])", r"\1", text)).strip()


def regroup(text: str, n: int, how: str, marker: str = "Section") -> str:
    """The sentences of ``text`` in ``n`` groups, in order and as even as they go, laid out as
    paragraphs, lines, numbered sections or bullets (``how``); unchanged with fewer than n sentences."""
    sents = rubric.sentences(text)
    if n < 1 or len(sents) < n:
        return text
    size, extra = divmod(len(sents), n)
    groups, i = [], 0
    for g in range(n):
        j = i + size + (g < extra)
        groups.append(" ".join(sents[i:j]))
        i = j
    if how == "paragraphs":
        return "\n\n".join(groups)
    if how == "lines":
        return "\n".join(groups)
    if how == "sections":
        return "\n\n".join(f"{marker} {g + 1}\n{body}" for g, body in enumerate(groups))
    return "\n".join(f"* {body}" for body in groups)  # bullets


def name_keywords(text: str, keywords: list[str]) -> str:
    """A closing sentence naming the keywords the text lacks."""
    missing = [k for k in keywords if rubric._count_phrase(text, k) == 0]
    return f"{text.rstrip()} This is about {' and '.join(missing)}." if missing else text


def add_title(text: str) -> str:
    """A ``<<Title>>`` line in front: the first four words of the answer, capitalised."""
    title = " ".join(rubric.words(text)[:4]) or "Answer"
    return f"<<{title[:1].upper() + title[1:]}>>\n\n{text.lstrip()}"


def highlight(text: str, n: int) -> str:
    """The first ``n`` distinct words of four letters or more marked ``*word*`` (first occurrence)."""
    done: list[str] = []
    for w in rubric.words(text):
        if len(done) == n:
            break
        if len(w) >= 4 and w.isalpha() and w.lower() not in done:
            text = re.sub(rf"(?<![\w*]){re.escape(w)}(?![\w*])", f"*{w}*", text, count=1)
            done.append(w.lower())
    return text


PLACEHOLDERS = ("name", "date", "place", "time", "phone", "email", "address", "price")


def add_placeholders(text: str, n: int) -> str:
    """A last line of placeholders, ``[name] [date] …``, enough for ``n`` in all."""
    have = len(rubric._PLACEHOLDER_RE.findall(text))
    need = [f"[{p}]" for p in PLACEHOLDERS[: max(0, n - have)]]
    return f"{text.rstrip()}\n\n{' '.join(need)}" if need else text


def as_json(text: str) -> str:
    return json.dumps({"answer": text.strip()}, ensure_ascii=False)


# kind -> edit(text, **instruction params); applied in this order
EDITS: dict[str, Callable[..., str]] = {
    "word_count": cut_words,
    "sentence_count": cut_sentences,
    "forbidden_words": delete_words,
    "paragraph_count": lambda t, n: regroup(t, n, "paragraphs"),
    "line_count": lambda t, n: regroup(t, n, "lines"),
    "numbered_sections": lambda t, n, marker="Section": regroup(t, n, "sections", marker),
    "bullet_count": lambda t, n: regroup(t, n, "bullets"),
    "include_keywords": name_keywords,
    "title": add_title,
    "highlights": highlight,
    "placeholders": add_placeholders,
    "start_phrase": add_start_phrase,
    "postscript": add_postscript,
    "end_phrase": add_end_phrase,
    "no_commas": drop_commas,
    "json_format": as_json,
    "quotation": quote,
    "lowercase": str.lower,
    "uppercase": str.upper,
}


def apply_edit(spec: dict, text: str) -> str:
    """The edit of the instruction ``spec``'s kind, applied to ``text`` with its parameters."""
    return EDITS[spec["kind"]](text, **{k: v for k, v in spec.items() if k != "kind"})


SURFACE_EDITS: tuple[str, ...] = (
    "start_phrase",
    "postscript",
    "end_phrase",
    "no_commas",
    "quotation",
    "lowercase",
    "uppercase",
)
"""The edits that keep every word of the answer in place (plus ``finish``): what demonstrations
and the revisions among the K ranked answers (:func:`with_revisions`) get — the labeler's top
answer, often a revision, becomes a demonstration. SFT imitates its demonstrations word by word,
and the rewriting edits (cuts, regrouped sentences, a keyword sentence, a JSON wrapper) make
compliant but awkward text: with every edit in both places SFT followed fewer of the held-out
instructions than with these (docs/experiments.md). Every edit is
used in the edit sets (:func:`edit_set`), which only the reward model sees."""


@dataclass
class Revision:
    text: str
    finished: bool
    edits: list[str] = field(default_factory=list)  # what was changed, in order
    gold_before: float = 0.0
    gold_after: float = 0.0


def revise(prompt: Prompt, response: str, finished: bool = True, kinds: tuple[str, ...] | None = None) -> Revision:
    """Edit ``response`` towards the instructions of ``prompt``; see the module docstring.
    ``kinds``: only these edits (e.g. :data:`SURFACE_EDITS`; ``finish`` always); None = all."""
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
    for kind in EDITS:
        spec = specs.get(kind)
        if spec is None or (kinds is not None and kind not in kinds) or rubric.check_instruction(spec, text):
            continue
        candidate = apply_edit(spec, text)
        got = rubric.score(prompt, candidate, done).total
        if got > best:
            text, best = candidate, got
            edits.append(kind)
    return Revision(text=text, finished=done, edits=edits, gold_before=before, gold_after=best)


def with_revisions(
    prompt: Prompt, responses: list[str], finished: list[bool], max_k: int = 9
) -> tuple[list[str], list[bool], list[int | None]]:
    """The K sampled answers plus rule-revised versions of some of them, for the labeler to rank.

    The reward model can only learn what its rankings contrast. A 135M policy almost never
    answers in lowercase or ends with the asked phrase, so no sampled ranking shows such an
    answer, and the RM cannot tell PPO that it would be better. A revised answer beside its
    original (the same text, the instruction now met) is the cleanest contrast there is — the
    "labeler edits the answer" step of data collection (compare the human-edited demonstrations
    of InstructGPT and the revisions of Constitutional AI). The labeler still ranks all of them.
    Only the :data:`SURFACE_EDITS` are used here, since the top-ranked answer becomes a
    demonstration.

    Returns ``(responses, finished, revised_from)``: the K originals first, then up to
    ``max_k - K`` revisions, largest gold gain first (distinct texts only, none already sampled);
    ``revised_from[i]`` is the index of the original that response i revises (``None`` for samples).
    """
    seen = {r.strip() for r in responses}
    found: list[tuple[float, int, Revision]] = []
    for i, (r, f) in enumerate(zip(responses, finished)):
        rv = revise(prompt, r, f, kinds=SURFACE_EDITS)
        if rv.edits and rv.text.strip() not in seen:
            seen.add(rv.text.strip())
            found.append((rv.gold_after - rv.gold_before, i, rv))
    found.sort(key=lambda t: (-t[0], t[1]))
    extra = found[: max(0, max_k - len(responses))]
    return (
        [*responses, *(rv.text for _, _, rv in extra)],
        [*finished, *(rv.finished for _, _, rv in extra)],
        [*([None] * len(responses)), *(i for _, i, _ in extra)],
    )


def edit_set(prompt: Prompt, responses: list[str], finished: list[bool], max_k: int = 9) -> list[str]:
    """One finished answer and its edits, each fixing one missed instruction, plus the answer with
    all of them fixed: a second ranking of the prompt whose answers differ *only* in the
    instructions they follow ([] when no answer has a fixable miss).

    In a ranking of sampled answers nearly every pair also differs in length, finish and topic,
    and a small reward model learns those easy features first (the demo's round-1 RM ordered
    revised-against-sampled pairs that differ only in instructions no better than chance:
    docs/experiments.md). Here there is nothing else to learn. The base is the answer (cut back to its last sentence
    when it was cut off) with the most misses that an edit fixes; an edit counts only if it
    raises the gold score."""
    best: tuple[int, list[str]] = (0, [])
    for r, f in zip(responses, finished):
        base = r if f and not rubric.looks_unfinished(r) else finish(r)
        if not base:
            continue
        gold = rubric.score(prompt, base, True).total
        variants = [base]
        for spec in rubric.instructions_of(prompt):
            if spec["kind"] not in EDITS or rubric.check_instruction(spec, base):
                continue
            text = apply_edit(spec, base)
            if text not in variants and rubric.score(prompt, text, True).total > gold:
                variants.append(text)
        if len(variants) > 2:  # two or more single fixes: also all of them together
            whole = revise(prompt, base, True).text
            if whole not in variants:
                variants.append(whole)
        if len(variants) - 1 > best[0]:
            best = (len(variants) - 1, variants[:max_k])
    return best[1]
