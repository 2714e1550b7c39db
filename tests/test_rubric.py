"""The gold rubric: every checker on hand-made passing and failing answers, the penalties, the
score formula on a hand example."""

from __future__ import annotations

import math

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
    ({"kind": "keyword_frequency", "keyword": "water", "relation": "at_least", "n": 2},
     "Water first, then more water.", "Water once, and waterfall does not count."),
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
    ({"kind": "numbered_sections", "n": 2}, "Section 1\nPrep.\n## SECTION 2\nCook.", "Section 1\nPrep.\nSection 3\nCook."),
    ({"kind": "numbered_sections", "n": 2, "marker": "Step"}, "**Step 1**: boil.\nStep 2: eat.", "Step 1 boil. Step 2 eat."),
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
    scores = rubric.score_many([p, p, p], ["all good here.", "Not, at all.", "fine, ok."])
    # passes: [T, T], [F, F], [T, F] -> 3 / 6 at instruction level, 1 / 3 at prompt level
    assert rubric.instruction_following_rate(scores) == pytest.approx(0.5)
    assert rubric.instruction_following_rate(scores, level="prompt") == pytest.approx(1 / 3)
    assert math.isnan(rubric.instruction_following_rate([]))
    with pytest.raises(ValueError):
        rubric.instruction_following_rate(scores, level="token")
    with pytest.raises(ValueError):
        rubric.score_many([p], ["a", "b"])
