"""The gold rubric: every checker on hand-made passing and failing answers, the penalties, the
score formula on a hand example."""

from __future__ import annotations

import math
import re

import pytest

from rlhfkit.data.records import Prompt, as_messages
from rlhfkit.feedback import rubric
from rlhfkit.feedback.rubric import check_instruction, score

# (instruction, passing answer, failing answer) — at least one case per kind
CASES = [
    ({"kind": "lowercase"}, "all in lowercase, even p.s. notes.", "Mostly lowercase but one Capital."),
    ({"kind": "uppercase"}, "ALL CAPS, 100%!", "ALL CAPS but one word."),
    ({"kind": "word_count", "relation": "at_most", "n": 5}, "One two three four five.", "One two three four five six."),
    ({"kind": "word_count", "relation": "at_least", "n": 3}, "I don't know yet.", "Don't know."),
    ({"kind": "word_count", "relation": "exactly", "n": 2}, "Hello world!", "Hello there world!"),
    ({"kind": "sentence_count", "relation": "exactly", "n": 3}, "Hi. It costs 3.5 euros! Is that ok?", "Hi. Bye."),
    ({"kind": "sentence_count", "relation": "at_most", "n": 2}, "One sentence only", "One. Two. Three."),
    ({"kind": "paragraph_count", "n": 2}, "First part.\n***\nSecond part.", "One block\nwith two lines."),
    ({"kind": "paragraph_count", "n": 3}, "<<t>>\n\nA.\n\nB.\n\n\nC.", "A.\n\nB."),
    ({"kind": "include_keywords", "keywords": ["rice", "pot"]}, "Put the Rice in a POT.", "Put the rice in a pan."),
    ({"kind": "include_keywords", "keywords": ["tea"]}, "Tea time.", "A steaming cup."),  # "steaming" is not "tea"
    ({"kind": "forbidden_words", "words": ["very", "good"]}, "Everybody is goodish.", "It is Very nice."),
    (
        {"kind": "keyword_frequency", "keyword": "water", "relation": "at_least", "n": 2},
        "Water first, then more water.",
        "Water once, and waterfall does not count.",
    ),
    ({"kind": "bullet_count", "n": 3}, "Tips:\n* one\n- two\n  * three", "* one\n* two\n***\nnot a bullet"),
    ({"kind": "json_format"}, '```json\n{"a": [1, 2]}\n```', '{"a": 1} and some words'),
    ({"kind": "json_format"}, '[{"name": "lamp"}]', '"just a string"'),
    ({"kind": "title"}, "<<My Rice>>\nCook it.", "<My Rice>\nCook it."),
    ({"kind": "start_phrase", "phrase": "Here is"}, '  "here is the plan.', "So, here is the plan."),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Done. hope this helps!  ", "Hope this helps! Bye."),
    ({"kind": "quotation"}, '"All of it quoted."', '"Quoted" and then not.'),
    ({"kind": "quotation"}, "“Curly quotes count.”", '""'),
    ({"kind": "placeholders", "n": 2}, "Dear [name], see you at [address].", "Dear [name], see you soon."),
    ({"kind": "postscript"}, "Body.\n\nP.S. Bring snacks.", "Body. P.S. inline does not count."),
    ({"kind": "postscript", "marker": "P.P.S."}, "Body.\nP. P. S. more", "Body.\nP.S. only one."),
    ({"kind": "no_commas"}, "No commas here at all.", "Yes, one comma."),
    (
        {"kind": "numbered_sections", "n": 2},
        "Section 1\nPrep.\n## SECTION 2\nCook.",
        "Section 1\nPrep.\nSection 3\nCook.",
    ),
    (
        {"kind": "numbered_sections", "n": 2, "marker": "Step"},
        "**Step 1**: boil.\nStep 2: eat.",
        "Step 1 boil. Step 2 eat.",
    ),
    ({"kind": "highlights", "n": 2}, "Use *fresh* herbs and **good** oil.", "Use *fresh herbs and oil.\n* a bullet"),
    ({"kind": "line_count", "n": 3}, "<<poem>>\nroses\n\nare\nred", "roses\nare"),
]


@pytest.mark.parametrize("spec,good,bad", CASES, ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(CASES)])
def test_checker_pass_and_fail(spec, good, bad):
    assert check_instruction(spec, good) is True
    assert check_instruction(spec, bad) is False


def test_every_kind_has_cases_and_a_docstring():
    assert len(rubric.KINDS) >= 15
    assert {c[0]["kind"] for c in CASES} == set(rubric.KINDS)
    for kind, fn in rubric.CHECKERS.items():
        assert fn.__doc__ and len(fn.__doc__) > 20, kind


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "nope"},
        {"kind": "word_count", "n": 5},  # missing relation
        {"kind": "word_count", "relation": "about", "n": 5},
        {"kind": "bullet_count", "n": "3"},
        {"kind": "lowercase", "extra": 1},
        {"kind": "include_keywords", "keywords": []},
        {"no": "kind"},
    ],
)
def test_invalid_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        rubric.validate_instruction(spec)


def test_counting_helpers():
    assert rubric.words("I don't eat 3.5 eggs, or 1,000.") == ["I", "don't", "eat", "3.5", "eggs", "or", "1,000"]
    assert rubric.sentences('He said "stop." Then e.g. left? yes') == ['He said "stop."', "Then e.g.", "left?", "yes"]
    # list markers and the P.S. marker do not end sentences
    assert len(rubric.sentences("1. Rinse the rice.\n2. Boil it!\n\nP.S. Enjoy it.")) == 3
    assert rubric.paragraphs("a\n \nb\n***\nc\n\n***\n\nd") == ["a", "b", "c", "d"]


def _prompt(*instructions, topics=None):
    meta = {"instructions": list(instructions)}
    if topics:
        meta["topic_keywords"] = topics
    return Prompt(messages=as_messages("Tell me about rice."), meta=meta)


def test_score_formula_hand_example():
    # lowercase passes, no_commas fails, word_count <= 10 passes -> followed = 2/3
    p = _prompt({"kind": "lowercase"}, {"kind": "no_commas"}, {"kind": "word_count", "relation": "at_most", "n": 10})
    answer = "rice is nice, cook it slowly in a pot."  # 9 words
    s = score(p, answer)
    assert s.passed == [True, False, True]
    assert s.followed == pytest.approx(2 / 3)
    assert s.penalties == {}
    assert s.total == pytest.approx(2 / 3)
    # the same answer cut off by the length limit: 2/3 - 0.3
    s = score(p, answer, finished=False)
    assert s.penalties == {"unfinished": 0.3}
    assert s.total == pytest.approx(2 / 3 - 0.3)
    assert s.to_dict()["instructions"][1] == {"kind": "no_commas", "passed": False}
    # too short: 2 words of the minimum 8 -> 0.3 * 6 / 8 = 0.225
    s = score(p, "rice, yes.")
    assert s.penalties == {"too_short": pytest.approx(0.225)}
    assert s.total == pytest.approx(2 / 3 - 0.225)
    # the minimum follows a lower word cap: at most 4 words -> minimum 4
    p4 = _prompt({"kind": "word_count", "relation": "at_most", "n": 4})
    assert score(p4, "Rice needs water.").penalties == {"too_short": pytest.approx(0.3 / 4)}
    assert score(p4, "Rice needs warm water.").penalties == {}


def test_no_instructions_means_full_credit_and_empty_means_minus_one():
    p = _prompt()
    assert score(p, "Rice is a grain that people cook in water.").total == 1.0
    p = _prompt({"kind": "no_commas"})
    s = score(p, "   \n ")
    assert s.total == -1.0 and s.followed == 0.0 and s.passed == [False] and s.penalties == {"empty": 1.0}


def test_repetition_penalty():
    natural = "Rinse the rice twice. Add water and a pinch of salt, then simmer for fifteen minutes with the lid on."
    loop = "add the rice to the pot. " * 12
    assert rubric.repetition(natural) == 0.0
    assert rubric.repetition(loop) > 0.8
    assert rubric.repetition("a line\na line\na line\nanother") == pytest.approx(0.5)
    p = _prompt({"kind": "lowercase"})
    assert "degenerate" not in score(p, natural.lower()).penalties
    s = score(p, loop)
    assert s.penalties["degenerate"] == pytest.approx(0.5)
    assert s.total == pytest.approx(0.5)
    # linear in between: 10 one-word lines, 3 repeats -> d = 0.3 (too few 4-grams to count)
    # -> penalty 0.5 * (0.3 - 0.2) / 0.3 = 1/6
    text = "apple\npear\nplum\nfig\nkiwi\nlime\ndate\napple\npear\nplum"
    assert rubric.repetition(text) == pytest.approx(0.3)
    assert score(_prompt(), text).penalties == {"degenerate": pytest.approx(1 / 6)}


def test_unfinished_detection():
    assert rubric.looks_unfinished("Boil the water and then add the")
    assert rubric.looks_unfinished("First, rinse the rice,")
    assert rubric.looks_unfinished("Here are the steps:")
    assert rubric.looks_unfinished("Rinse the rice well in cold water and let it drain for a few minutes then")
    assert not rubric.looks_unfinished("Boil the water.")
    assert not rubric.looks_unfinished("roses are red\nviolets are blue")  # a poem line
    assert not rubric.looks_unfinished("Pack:\n- boots\n- a warm jacket")
    assert not rubric.looks_unfinished('{"a": 1}')
    p = _prompt()
    assert score(p, "Boil the rice in water and then add the").penalties == {"unfinished": 0.3}
    # ending with a required phrase counts as finished even without final punctuation
    p = _prompt({"kind": "end_phrase", "phrase": "that is all for the"})
    assert score(p, "Cook the rice and that is all for the").penalties == {}


def test_toxic_penalty_uses_better_profanity_lexicon():
    from better_profanity import profanity

    text = "This rice recipe is shit and you are a bitch."
    assert profanity.contains_profanity(text)  # the lexicon's own verdict agrees
    assert rubric.toxic_words(text) == ["shit", "bitch"]
    assert rubric.toxic_words("A classic assessment of Scunthorpe cocktails.") == []
    assert profanity.contains_profanity("Boil the rice in a pot.")  # the raw list flags cooking words,
    assert rubric.toxic_words("Boil the rice in a pot and pull the weeds.") == []  # our allowlist does not
    s = score(_prompt(), text)
    assert s.penalties == {"toxic": 1.0}  # 2 words x 0.5, capped at 1.0
    assert s.total == 0.0
    assert score(_prompt(), "This rice recipe is shit and nobody should cook it.").penalties == {"toxic": 0.5}


def test_off_topic_penalty():
    p = _prompt({"kind": "no_commas"}, topics=["rice", "photos"])
    assert score(p, "Cook the rice slowly with the lid on the pot.").penalties == {}
    assert score(p, "Take a photo of it before you serve it warm.").penalties == {}  # "photos" matches "photo"
    s = score(p, "I like turtles and other animals with hard shells.")
    assert s.penalties == {"off_topic": 0.2} and s.total == pytest.approx(0.8)
    # no topic keywords: never off topic
    assert score(_prompt(), "I like turtles and other animals with hard shells.").penalties == {}


def test_instruction_following_rate():
    p = _prompt({"kind": "lowercase"}, {"kind": "no_commas"})
    scores = [score(p, r) for r in ("all good here.", "Not, at all.", "fine, ok.")]
    # passes: [T, T], [F, F], [T, F] -> 3 / 6 at instruction level, 1 / 3 at prompt level
    assert rubric.instruction_following_rate(scores) == pytest.approx(0.5)
    assert rubric.instruction_following_rate(scores, level="prompt") == pytest.approx(1 / 3)
    assert math.isnan(rubric.instruction_following_rate([]))
    with pytest.raises(ValueError):
        rubric.instruction_following_rate(scores, level="token")


# ---------------------------------------------------------------- found by mutation testing
# Each test below kills mutants of `make mutate` that the tests above let survive (docs/testing.md).


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message, not a substring of it."""
    return "^" + re.escape(message) + "$"


def test_case_checkers_need_at_least_one_letter():
    # "no uppercase letter anywhere" is also true of digits and punctuation alone: that is not
    # an answer in lowercase (nor, the other way round, in capitals)
    for kind in ("lowercase", "uppercase"):
        assert check_instruction({"kind": kind}, "123, 456!") is False, kind
        assert check_instruction({"kind": kind}, "42") is False, kind
    assert check_instruction({"kind": "lowercase"}, "2 cups of rice.") is True
    assert check_instruction({"kind": "uppercase"}, "2 CUPS OF RICE.") is True


def test_more_checker_edges():
    # multi-word keywords match across any run of whitespace, whole words, any case
    assert check_instruction({"kind": "include_keywords", "keywords": ["olive oil"]}, "Use OLIVE\n  oil.") is True
    assert (
        check_instruction(
            {"kind": "keyword_frequency", "keyword": "olive oil", "relation": "exactly", "n": 2},
            "Olive oil first, then more olive oil.",
        )
        is True
    )
    # only quotation marks are stripped before a start/end phrase, not letters
    assert check_instruction({"kind": "start_phrase", "phrase": "Xavier"}, "Xavier cooks.") is True
    assert check_instruction({"kind": "end_phrase", "phrase": "see you, MAX"}, '"See you, MAX"') is True
    # quotation marks on both ends, nothing else
    assert check_instruction({"kind": "quotation"}, 'X marks the spot"') is False
    assert check_instruction({"kind": "quotation"}, '"The end is X') is False
    # the full-width comma is a comma too
    assert check_instruction({"kind": "no_commas"}, "Yes，one comma.") is False
    # n = 0 is a valid count
    assert check_instruction({"kind": "placeholders", "n": 0}, "No brackets.") is True
    with pytest.raises(ValueError, match=exactly("relation must be 'at_most', 'at_least' or 'exactly', got 'about'")):
        rubric.check_word_count("two words", "about", 2)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"no": "kind"}, "an instruction is a dict with a 'kind', got {'no': 'kind'}"),
        ({"kind": "nope"}, "unknown instruction kind 'nope'; known: " + ", ".join(rubric.KINDS)),
        ({"kind": "lowercase", "extra": 1}, "instruction 'lowercase' takes no parameter 'extra' (takes: [])"),
        ({"kind": "bullet_count", "n": "3"}, "instruction 'bullet_count': 'n' must be int, got '3'"),
        ({"kind": "bullet_count", "n": True}, "instruction 'bullet_count': 'n' must be int, got True"),
        (
            {"kind": "include_keywords", "keywords": []},
            "instruction 'include_keywords': 'keywords' must be a non-empty list of words",
        ),
        (
            {"kind": "include_keywords", "keywords": ["rice", "  "]},
            "instruction 'include_keywords': 'keywords' must be a non-empty list of words",
        ),
        ({"kind": "word_count", "n": 5}, "instruction 'word_count' needs parameter 'relation'"),
        (
            {"kind": "word_count", "relation": "about", "n": 5},
            "instruction 'word_count': relation must be at_most/at_least/exactly, got 'about'",
        ),
        ({"kind": "bullet_count", "n": -1}, "instruction 'bullet_count': n must be >= 0, got -1"),
    ],
)
def test_invalid_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=exactly(message)):
        rubric.validate_instruction(spec)


def test_counting_edges():
    # a dangling list marker at the end (an answer cut after "2. ") is no sentence
    assert rubric.sentences("Steps:\n1. Boil.\n2. ") == ["Steps:\nBoil."]
    # 11 words = exactly 8 word 4-grams, the minimum that counts: "rice water salt pot" twice
    # → 7 distinct of 8 → 1 − 7/8 = 0.125
    assert rubric.repetition("rice water salt pot rice water salt pot lid heat time") == pytest.approx(0.125)
    # 3 lines, the minimum that counts: one repeat → 1 − 2/3; two lines never count
    assert rubric.repetition("a line\na line\nanother") == pytest.approx(1 / 3)
    assert rubric.repetition("same line\nsame line") == 0.0


def test_unfinished_edges():
    assert rubric.looks_unfinished("")
    assert rubric.looks_unfinished("  \n ")
    # long unpunctuated list items are finished: a bullet, a numbered step
    assert not rubric.looks_unfinished("Pack:\n- boots and a warm jacket for the cold nights up in the hills")
    assert not rubric.looks_unfinished("Steps:\n2. rinse the rice in cold water until the water runs clear")
    # a prose line without final punctuation is cut off from 11 words on
    assert not rubric.looks_unfinished("rinse the rice in cold water until the water clears")  # 10 words
    assert rubric.looks_unfinished("rinse the rice in cold water until the water runs clear")  # 11 words


def test_toxic_lexicon_phrases_of_several_words():
    # the lexicon's entries have up to 4 words; "strip" alone is allowed, "strip club" is not
    assert rubric.toxic_words("We met near the strip club.") == ["strip club"]
    assert rubric.toxic_words("They joked about 2 girls 1 cup.") == ["2 girls 1 cup"]


def test_off_topic_stems():
    def off(topics, answer):
        return rubric.off_topic(_prompt(topics=topics), answer)

    # only a final "s" of a keyword longer than 3 letters is dropped
    assert off(["rice"], "A rich dessert of cream and sugar.")  # "rice" stays "rice": "rich" does not match
    assert off(["photos"], "Put the cake on a plate.")  # "photo", not "p"
    assert off(["cups"], "A cute dog.")  # "cup", not "cu"
    assert not off(["cups"], "Use one cup.")  # "cups" → "cup" matches "cup"
    assert off(["gas"], "The game is on.")  # 3 letters: "gas" is kept whole


def test_score_to_dict_and_empty_answers():
    p = _prompt({"kind": "no_commas"})
    s = score(p, "Rice is a grain that people cook in water.")
    assert s.to_dict() == {
        "total": 1.0,
        "followed": 1.0,
        "instructions": [{"kind": "no_commas", "passed": True}],
        "penalties": {},
    }
    empty = score(p, "")
    assert empty.to_dict() == {
        "total": -1.0,
        "followed": 0.0,
        "instructions": [{"kind": "no_commas", "passed": False}],
        "penalties": {"empty": 1.0},
    }


def test_score_penalty_edges():
    # a passed instruction other than end_phrase / json / quotation does not excuse a cut-off ending
    s = score(_prompt({"kind": "lowercase"}), "boil the rice in plenty of water and then add the")
    assert s.passed == [True] and s.penalties == {"unfinished": 0.3}
    # an at_least word count does not lower the minimum of 8 words: 3 words → 0.3 · 5/8
    s = score(_prompt({"kind": "word_count", "relation": "at_least", "n": 3}), "Rice needs water.")
    assert s.penalties == {"too_short": pytest.approx(0.1875)}
    # the total is clipped at −1: 0 followed − (toxic 1.0 + unfinished 0.3)
    s = score(_prompt({"kind": "lowercase"}), "This rice is shit and you are a bitch and")
    assert s.penalties == {"toxic": 1.0, "unfinished": 0.3}
    assert s.total == -1.0


def test_score_finished_flag_and_prompt_level_rate():
    p = _prompt()
    answer = "Rice is a grain that people cook in water."
    assert score(p, answer).penalties == {}  # finished defaults to True
    assert score(p, answer, False).penalties == {"unfinished": 0.3}
    # prompt level: an empty answer follows nothing, even to a prompt without instructions
    scores = [score(p, answer), score(p, "")]
    assert rubric.instruction_following_rate(scores, level="prompt") == 0.5
    assert math.isnan(rubric.instruction_following_rate([], level="prompt"))
    with pytest.raises(ValueError, match=exactly("level must be 'instruction' or 'prompt', got 'token'")):
        rubric.instruction_following_rate(scores, level="token")
