"""The gold rubric: a transparent, rule-based judge of a response against the verifiable
instructions attached to its prompt (in the spirit of IFEval, Zhou et al. 2023, written by us).

A prompt of the built-in task carries ``meta["instructions"]``, a list of JSON-able dicts such as
``{"kind": "word_count", "relation": "at_most", "n": 50}``. Each ``kind`` names a small checker
in :data:`CHECKERS` (``response, **params -> bool``) whose docstring says exactly what passes.

The score (``score(prompt, response, finished) -> GoldScore``)::

    followed = (number of instructions passed) / (number of instructions)   # 1.0 if none
    total    = clip(followed - sum(penalties.values()), -1, 1)

with these penalties (weights in :class:`PenaltyWeights`, each listed in ``GoldScore.penalties``
only when it applies):

- ``empty``      1.0  the answer has no word at all; ``followed`` is then 0 (nothing was followed).
- ``unfinished`` 0.3  ``finished=False`` (the generation hit its length limit without EOS), or the
  text visibly stops mid-sentence (:func:`looks_unfinished`) — unless it ends as an instruction
  asked (the end phrase, a closed JSON value, a closing quotation mark).
- ``degenerate`` up to 0.5: ``d = max(repeated word 4-gram share, repeated line share)``,
  penalty ``0.5 * clip((d - 0.2) / 0.3, 0, 1)`` — nothing up to 20 % repetition, full at 50 %.
- ``toxic``      0.5 per distinct word or phrase of the `better-profanity` lexicon, at most 1.0
  (a few everyday words of that list — "pot", "weed", "stroke", … — are allowed, see
  :data:`TOXIC_ALLOWLIST`).
- ``too_short``  up to 0.3: ``0.3 * (m - words) / m`` for answers of fewer than ``m = 8`` words
  (``m`` is lowered to ``n`` when an instruction asks for at most / exactly ``n`` words), so
  that "rice." cannot win by satisfying "use lowercase" while saying nothing.
- ``off_topic``  0.2  the prompt lists ``meta["topic_keywords"]`` (word stems written with the task)
  and the answer contains none of them. Prompts without topic keywords are never off topic.

So a perfect answer scores 1.0, an answer following half of its instructions 0.5, and junk goes
negative. :func:`instruction_following_rate` aggregates many scores at the instruction level
(share of all instructions followed) or the prompt level (share of answers following all of theirs).

Counting conventions (shared by the checkers; simple on purpose, so anyone can verify by hand):
words are runs of letters/digits ("don't", "3.5" and "1,000" are one word each);
sentences end with ``.``, ``!`` or ``?`` followed by a space or the end (a trailing fragment counts
as a sentence; list markers and "P.S." do not end one); paragraphs are separated by blank lines
or a line of ``***``; a line holding only a ``<<title>>`` is not counted as a paragraph or a line;
phrase and keyword matching ignores case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from rlhfkit.data.records import Prompt

# --------------------------------------------------------------------------------------------
# text helpers

_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+|[.,]\d+)*")
_SENT_END_RE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_PARA_SPLIT_RE = re.compile(r"\n[ \t]*\*\*\*+[ \t]*(?:\n|$)|\n[ \t]*\n")
_TITLE_RE = re.compile(r"<<[^\n<>]+>>")
_BULLET_RE = re.compile(r"^[ \t]*[*\-][ \t]+\S", re.MULTILINE)
_HIGHLIGHT_RE = re.compile(r"\*[^\s*](?:[^\n*]*[^\s*])?\*")
_PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]+\]")
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


_LIST_MARK_RE = re.compile(r"^[ \t]*(?:\d+[.)]|[*\-•]|#+)[ \t]+", re.MULTILINE)
_PS_MARK_RE = re.compile(r"^([ \t]*)(?:p\.\s?)+s\.", re.IGNORECASE | re.MULTILINE)


def words(text: str) -> list[str]:
    """The words of ``text``: runs of letters/digits; "don't", "3.5" and "1,000" are one word."""
    return _WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    """Sentences: split after a run of ``.``/``!``/``?`` (with any closing quotes or brackets)
    that precedes whitespace or the end. List markers ("1.", "-", "*", "#") at the start of a
    line and postscript markers ("P.S.") do not end a sentence; pieces without a letter or digit
    are dropped. Abbreviations like "e.g." do end one (kept simple on purpose)."""
    text = _PS_MARK_RE.sub(r"\1PS", _LIST_MARK_RE.sub("", text))
    pieces, start = [], 0
    for m in _SENT_END_RE.finditer(text):
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if words(p)]


def _is_title_line(chunk: str) -> bool:
    return bool(_TITLE_RE.fullmatch(chunk.strip()))


def paragraphs(text: str) -> list[str]:
    """Paragraphs: chunks separated by blank lines or a line of ``***``; empty chunks and
    title-only chunks (``<<a title>>``) are not counted."""
    chunks = _PARA_SPLIT_RE.split(text.strip())
    return [c.strip() for c in chunks if c.strip() and c.strip() != "***" and not _is_title_line(c)]


def lines(text: str) -> list[str]:
    """Non-empty lines, title-only lines not counted."""
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not _is_title_line(ln)]


def _count_phrase(text: str, phrase: str) -> int:
    """Whole-word, case-insensitive occurrences of ``phrase`` (a word or several)."""
    pat = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?![^\W_])"
    return len(re.findall(pat, text, flags=re.IGNORECASE))


def _compare(value: int, relation: str, n: int) -> bool:
    if relation == "at_most":
        return value <= n
    if relation == "at_least":
        return value >= n
    if relation == "exactly":
        return value == n
    raise ValueError(f"relation must be 'at_most', 'at_least' or 'exactly', got {relation!r}")


def _strip_quotes(text: str) -> str:
    return text.strip().strip('"“”').strip()


# --------------------------------------------------------------------------------------------
# the checkers: one small function per instruction kind, ``(response, **params) -> bool``


def check_lowercase(response: str) -> bool:
    """The whole answer is in lowercase: no uppercase letter anywhere (and at least one letter)."""
    return response == response.lower() and any(c.isalpha() for c in response)


def check_uppercase(response: str) -> bool:
    """The whole answer is in capital letters: no lowercase letter anywhere (and at least one)."""
    return response == response.upper() and any(c.isalpha() for c in response)


def check_word_count(response: str, relation: str, n: int) -> bool:
    """The number of words compares to ``n`` by ``relation`` (at_most / at_least / exactly)."""
    return _compare(len(words(response)), relation, n)


def check_sentence_count(response: str, relation: str, n: int) -> bool:
    """The number of sentences (see :func:`sentences`) compares to ``n`` by ``relation``."""
    return _compare(len(sentences(response)), relation, n)


def check_paragraph_count(response: str, n: int) -> bool:
    """Exactly ``n`` paragraphs, separated by blank lines or by a line of ``***``."""
    return len(paragraphs(response)) == n


def check_include_keywords(response: str, keywords: list[str]) -> bool:
    """Every keyword appears at least once (whole word, any case)."""
    return all(_count_phrase(response, k) > 0 for k in keywords)


def check_forbidden_words(response: str, words: list[str]) -> bool:
    """None of the forbidden words appears (whole word, any case)."""
    return all(_count_phrase(response, w) == 0 for w in words)


def check_keyword_frequency(response: str, keyword: str, relation: str, n: int) -> bool:
    """The keyword (whole word, any case) appears a number of times that compares to ``n``."""
    return _compare(_count_phrase(response, keyword), relation, n)


def check_bullet_count(response: str, n: int) -> bool:
    """Exactly ``n`` markdown bullet points: lines starting with ``* `` or ``- ``."""
    return len(_BULLET_RE.findall(response)) == n


def check_json_format(response: str) -> bool:
    """The whole answer parses as a JSON object or array; one ```json (or ```) fence around it
    is allowed. A bare JSON string or number does not count."""
    text = response.strip()
    m = _FENCE_RE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def check_title(response: str) -> bool:
    """The answer contains a title in double angular brackets, like ``<<my title>>``."""
    return bool(_TITLE_RE.search(response))


def check_start_phrase(response: str, phrase: str) -> bool:
    """The answer begins with ``phrase`` (leading spaces and quotes ignored, any case)."""
    return _strip_quotes(response).lower().startswith(phrase.strip().lower())


def check_end_phrase(response: str, phrase: str) -> bool:
    """The answer ends with ``phrase`` exactly, nothing after it (trailing spaces and quotes
    ignored, any case)."""
    return _strip_quotes(response).lower().endswith(phrase.strip().lower())


def check_quotation(response: str) -> bool:
    """The whole answer is wrapped in double quotation marks (``"…"`` or ``“…”``)."""
    text = response.strip()
    return len(text) >= 2 and text[0] in '"“' and text[-1] in '"”' and bool(words(text))


def check_placeholders(response: str, n: int) -> bool:
    """At least ``n`` placeholders in square brackets, like ``[name]`` or ``[address]``."""
    return len(_PLACEHOLDER_RE.findall(response)) >= n


def check_postscript(response: str, marker: str = "P.S.") -> bool:
    """A line starts with the postscript ``marker`` (``P.S.`` or ``P.P.S.``; any case, a space
    after each dot allowed) followed by some text."""
    letters = [c for c in marker if c.isalpha()]
    pat = r"^[ \t]*" + r"\.\s?".join(re.escape(c) for c in letters) + r"\.\s*\S"
    return bool(re.search(pat, response, flags=re.IGNORECASE | re.MULTILINE))


def check_no_commas(response: str) -> bool:
    """No comma anywhere in the answer (ASCII ``,`` or full-width ``，``)."""
    return "," not in response and "，" not in response and bool(words(response))


def check_numbered_sections(response: str, n: int, marker: str = "Section") -> bool:
    """Exactly ``n`` sections marked ``{marker} 1``, ``{marker} 2``, … ``{marker} n`` in this
    order (any case), each marker at the start of a line (after optional ``#``/``*`` markup)."""
    pat = rf"^[ \t#*]*{re.escape(marker)}\s+(\d+)"
    found = [int(x) for x in re.findall(pat, response, flags=re.IGNORECASE | re.MULTILINE)]
    return found == list(range(1, n + 1))


def check_highlights(response: str, n: int) -> bool:
    """At least ``n`` highlighted spans in markdown, ``*like this*`` (or ``**like this**``), each
    within one line, not starting or ending with a space (so a ``* bullet`` is no highlight)."""
    return len(_HIGHLIGHT_RE.findall(response)) >= n


def check_line_count(response: str, n: int) -> bool:
    """Exactly ``n`` non-empty lines (a line holding only a ``<<title>>`` is not counted)."""
    return len(lines(response)) == n


Checker = Callable[..., bool]

CHECKERS: dict[str, Checker] = {
    "lowercase": check_lowercase,
    "uppercase": check_uppercase,
    "word_count": check_word_count,
    "sentence_count": check_sentence_count,
    "paragraph_count": check_paragraph_count,
    "include_keywords": check_include_keywords,
    "forbidden_words": check_forbidden_words,
    "keyword_frequency": check_keyword_frequency,
    "bullet_count": check_bullet_count,
    "json_format": check_json_format,
    "title": check_title,
    "start_phrase": check_start_phrase,
    "end_phrase": check_end_phrase,
    "quotation": check_quotation,
    "placeholders": check_placeholders,
    "postscript": check_postscript,
    "no_commas": check_no_commas,
    "numbered_sections": check_numbered_sections,
    "highlights": check_highlights,
    "line_count": check_line_count,
}
"""Instruction kind -> checker. Parameters of a spec are the checker's keyword arguments."""

# required / optional parameters and their types, for validation with a clear message
_PARAMS: dict[str, dict[str, tuple[type, bool]]] = {
    "lowercase": {},
    "uppercase": {},
    "word_count": {"relation": (str, True), "n": (int, True)},
    "sentence_count": {"relation": (str, True), "n": (int, True)},
    "paragraph_count": {"n": (int, True)},
    "include_keywords": {"keywords": (list, True)},
    "forbidden_words": {"words": (list, True)},
    "keyword_frequency": {"keyword": (str, True), "relation": (str, True), "n": (int, True)},
    "bullet_count": {"n": (int, True)},
    "json_format": {},
    "title": {},
    "start_phrase": {"phrase": (str, True)},
    "end_phrase": {"phrase": (str, True)},
    "quotation": {},
    "placeholders": {"n": (int, True)},
    "postscript": {"marker": (str, False)},
    "no_commas": {},
    "numbered_sections": {"n": (int, True), "marker": (str, False)},
    "highlights": {"n": (int, True)},
    "line_count": {"n": (int, True)},
}

KINDS: tuple[str, ...] = tuple(CHECKERS)


def validate_instruction(spec: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem unless ``spec`` is a checkable instruction."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"an instruction is a dict with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind not in CHECKERS:
        raise ValueError(f"unknown instruction kind {kind!r}; known: {', '.join(KINDS)}")
    allowed = _PARAMS[kind]
    for name, value in spec.items():
        if name == "kind":
            continue
        if name not in allowed:
            raise ValueError(f"instruction {kind!r} takes no parameter {name!r} (takes: {sorted(allowed)})")
        typ = allowed[name][0]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"instruction {kind!r}: {name!r} must be {typ.__name__}, got {value!r}")
        if typ is list and not (value and all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(f"instruction {kind!r}: {name!r} must be a non-empty list of words")
    for name, (_, required) in allowed.items():
        if required and name not in spec:
            raise ValueError(f"instruction {kind!r} needs parameter {name!r}")
    if "relation" in spec and spec["relation"] not in ("at_most", "at_least", "exactly"):
        raise ValueError(f"instruction {kind!r}: relation must be at_most/at_least/exactly, got {spec['relation']!r}")
    if "n" in spec and spec["n"] < 0:
        raise ValueError(f"instruction {kind!r}: n must be >= 0, got {spec['n']}")


def check_instruction(spec: dict[str, Any], response: str) -> bool:
    """Whether ``response`` follows the instruction ``spec`` (validated first)."""
    validate_instruction(spec)
    params = {k: v for k, v in spec.items() if k != "kind"}
    return bool(CHECKERS[spec["kind"]](response, **params))


# --------------------------------------------------------------------------------------------
# penalties

_TERMINAL = ".!?)\"'”’]}>*`~…"
_CUT_CHARS = ",;:-–—(/&"
_FUNCTION_WORDS = frozenset(
    "the a an and or but of to in on for with at by from is are was were be been that which this "
    "these those my your their our its as if so because than then while when into about".split()
)


def looks_unfinished(text: str) -> bool:
    """Heuristic for an answer cut off mid-sentence (``finished`` is the reliable signal).

    Unfinished when the text ends with a dangling character (``, ; : - ( / &``), or ends with a
    function word ("the", "and", "of", …) and no final punctuation, or its last line is a prose
    line of more than 10 words without final punctuation. Short unpunctuated last lines (a poem
    line, a list item, a heading) count as finished.
    """
    t = text.rstrip()
    if not t:
        return True
    if t[-1] in _CUT_CHARS:
        return True
    if t[-1] in _TERMINAL:
        return False
    last_line = t.splitlines()[-1]
    ws = words(last_line)
    if ws and ws[-1].lower() in _FUNCTION_WORDS:
        return True
    if _BULLET_RE.match(last_line) or re.match(r"^\s*(\d+[.)]|#)", last_line):
        return False
    return len(ws) > 10


def repetition(text: str) -> float:
    """Degeneracy in [0, 1]: the larger of (a) the share of word 4-grams that repeat an earlier
    4-gram (texts of >= 8 4-grams) and (b) the share of non-empty lines that repeat an earlier
    line (texts of >= 3 lines). Natural answers stay well below 0.2; loops approach 1."""
    ws = [w.lower() for w in words(text)]
    grams = [tuple(ws[i : i + 4]) for i in range(len(ws) - 3)]
    ngram_rep = 1 - len(set(grams)) / len(grams) if len(grams) >= 8 else 0.0
    ls = [ln.lower() for ln in lines(text)]
    line_rep = 1 - len(set(ls)) / len(ls) if len(ls) >= 3 else 0.0
    return max(ngram_rep, line_rep)


# Entries of the better-profanity list that are ordinary words in everyday advice (a rice *pot*,
# garden *weeds*, a swimming *stroke*, olive oil *virgin*, pork *loin*, *fat* in a diet, *kill*
# germs, a letter signed *xx*, medical terms): never counted as toxic here.
TOXIC_ALLOWLIST = frozenset(
    "pot weed kill fat god organ oral rum vodka strip stroke screw slope thrust pawn paddy loin loins "
    "virgin seaman seamen facial revue maxi len hemp erect urine urinal uterus womb ovary ovum ovums "
    "menses tampon herpes hiv xx".split()
)


@lru_cache(maxsize=1)
def _toxic_lexicon() -> tuple[frozenset[str], int]:
    """The better-profanity word list (lowercased) minus :data:`TOXIC_ALLOWLIST`, and the
    longest entry in words."""
    from better_profanity.utils import get_complete_path_of_file, read_wordlist

    entries = {w.strip().lower() for w in read_wordlist(get_complete_path_of_file("profanity_wordlist.txt"))}
    entries = {" ".join(e.split()) for e in entries if e.strip()} - TOXIC_ALLOWLIST
    return frozenset(entries), max(len(e.split()) for e in entries)


def toxic_words(text: str) -> list[str]:
    """Distinct entries of the `better-profanity` lexicon found in ``text`` as whole words or
    word sequences (case-insensitive). A plain set lookup over word n-grams: the word list of
    ``profanity.contains_profanity`` without its character-substitution variants and without
    :data:`TOXIC_ALLOWLIST`, ~1000x faster."""
    lexicon, longest = _toxic_lexicon()
    ws = [w.lower() for w in re.findall(r"[^\W_]+(?:[-'][^\W_]+)*", text)]
    found = []
    for i in range(len(ws)):
        for k in range(1, longest + 1):
            if i + k > len(ws):
                break
            g = " ".join(ws[i : i + k])
            if g in lexicon and g not in found:
                found.append(g)
    return found


def off_topic(prompt: Prompt, response: str) -> bool:
    """True when the prompt lists ``meta["topic_keywords"]`` and no word of the answer starts with
    any of them (a final "s" of a keyword is dropped first, so "photos" matches "photo").
    Deliberately weak: it only catches answers about nothing."""
    stems = [s.lower() for s in prompt.meta.get("topic_keywords") or []]
    stems = [s[:-1] if s.endswith("s") and len(s) > 3 else s for s in stems]  # "photos" matches "photo"
    if not stems:
        return False
    ws = {w.lower() for w in words(response)}
    return not any(w.startswith(s) for w in ws for s in stems)


# --------------------------------------------------------------------------------------------
# the score


@dataclass(frozen=True)
class PenaltyWeights:
    """How much each penalty subtracts from the instruction-following fraction."""

    empty: float = 1.0
    """An answer without a single word."""
    unfinished: float = 0.3
    """Cut off by the length limit (``finished=False``) or visibly mid-sentence."""
    degenerate: float = 0.5
    """Full weight at 50 % repetition, linear from 20 % (see :func:`repetition`)."""
    toxic: float = 0.5
    """Per distinct toxic lexicon entry, capped at ``toxic_max``."""
    toxic_max: float = 1.0
    """Cap of the toxic penalty."""
    off_topic: float = 0.2
    """The answer mentions none of the prompt's topic keywords."""
    too_short: float = 0.3
    """Full weight for a one-word answer, linear down to 0 at ``min_words``."""
    min_words: int = 8
    """Answers with fewer words are too short (unless an instruction caps the length lower)."""


@dataclass
class InstructionResult:
    spec: dict[str, Any]  # the instruction, e.g. {"kind": "no_commas"}
    passed: bool

    @property
    def kind(self) -> str:
        return self.spec["kind"]


@dataclass
class GoldScore:
    total: float  # followed - sum(penalties), clipped to [-1, 1]
    followed: float  # fraction of instructions passed (1.0 when there are none; 0.0 when empty)
    instructions: list[InstructionResult] = field(default_factory=list)
    penalties: dict[str, float] = field(default_factory=dict)  # only the penalties that apply

    @property
    def passed(self) -> list[bool]:
        return [r.passed for r in self.instructions]

    @property
    def all_followed(self) -> bool:
        return all(self.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "followed": self.followed,
            "instructions": [{**r.spec, "passed": r.passed} for r in self.instructions],
            "penalties": dict(self.penalties),
        }


def instructions_of(prompt: Prompt) -> list[dict[str, Any]]:
    return list(prompt.meta.get("instructions") or [])


def score(prompt: Prompt, response: str, finished: bool = True, weights: PenaltyWeights | None = None) -> GoldScore:
    """Judge ``response`` to ``prompt`` by the rubric; ``finished=False`` means the generation hit
    its length limit before EOS. See the module docstring for the formula."""
    w = weights or PenaltyWeights()
    specs = instructions_of(prompt)
    if not words(response):
        results = [InstructionResult(s, False) for s in specs]
        return GoldScore(total=-w.empty, followed=0.0, instructions=results, penalties={"empty": w.empty})

    results = [InstructionResult(s, check_instruction(s, response)) for s in specs]
    followed = sum(r.passed for r in results) / len(results) if results else 1.0

    penalties: dict[str, float] = {}
    ends_as_asked = any(r.passed and r.kind == "end_phrase" for r in results) or any(
        r.passed and r.kind in ("json_format", "quotation") for r in results
    )
    if not finished or (looks_unfinished(response) and not ends_as_asked):
        penalties["unfinished"] = w.unfinished
    rep = repetition(response)
    deg = w.degenerate * min(1.0, max(0.0, (rep - 0.2) / 0.3))
    if deg > 0:
        penalties["degenerate"] = deg
    tox = toxic_words(response)
    if tox:
        penalties["toxic"] = min(w.toxic_max, w.toxic * len(tox))
    if off_topic(prompt, response):
        penalties["off_topic"] = w.off_topic
    m = min([w.min_words] + [s["n"] for s in specs if s["kind"] == "word_count" and s["relation"] != "at_least"])
    n_words = len(words(response))
    if m > 0 and n_words < m:
        penalties["too_short"] = w.too_short * (m - n_words) / m

    total = max(-1.0, min(1.0, followed - sum(penalties.values())))
    return GoldScore(total=total, followed=followed, instructions=results, penalties=penalties)


def instruction_following_rate(scores: Iterable[GoldScore], level: str = "instruction") -> float:
    """Share of instructions followed over many answers.

    ``level="instruction"``: followed instructions / all instructions (IFEval's instruction-level
    accuracy). ``level="prompt"``: share of answers that follow all of their instructions.
    Empty answers count as following none.
    """
    scores = list(scores)
    if level == "instruction":
        n = sum(len(s.instructions) for s in scores)
        return sum(sum(s.passed) for s in scores) / n if n else float("nan")
    if level == "prompt":
        return (
            sum(s.all_followed and "empty" not in s.penalties for s in scores) / len(scores) if scores else float("nan")
        )
    raise ValueError(f"level must be 'instruction' or 'prompt', got {level!r}")


def gold_metrics(prompts: list[Prompt], responses: list[str], finished: list[bool]) -> dict[str, float]:
    """PPO's ``rollout_metrics`` for prompts with gold instructions: ``{"gold_score": mean}``, the mean
    rubric score of one iteration's responses; ``{}`` when a prompt has no ``meta["instructions"]``.
    A module-level function, so that a stage run in a child process can take it along (pickled)."""
    if not prompts or not all(p.meta.get("instructions") for p in prompts):
        return {}
    total = sum(score(p, r, f).total for p, r, f in zip(prompts, responses, finished))
    return {"gold_score": total / len(responses)}
