"""Rule-based revision of demonstrations: each edit does exactly what its docstring says, and
revise() keeps an edit only when the gold score rises."""

from rlhfkit.data.records import Prompt
from rlhfkit.feedback import revise as rv
from rlhfkit.feedback import rubric


def prompt(*instructions: dict) -> Prompt:
    return Prompt(
        messages=[{"role": "user", "content": "Tell me about rice."}], meta={"instructions": list(instructions)}
    )


ANSWER = "Rice is a grain, eaten all over the world. It grows in paddies, mostly in Asia."


def test_edits_by_hand():
    assert rv.add_start_phrase("  Rice grows.", "Great question!") == "Great question! Rice grows."
    assert rv.add_end_phrase("Rice grows. ", "Any other questions?") == "Rice grows. Any other questions?"
    assert rv.add_end_phrase("- rice\n- beans", "That is all.") == "- rice\n- beans\n\nThat is all."
    assert rv.add_postscript("Rice grows.", "P.P.S.") == "Rice grows.\n\nP.P.S. I hope this helps!"
    assert rv.drop_commas("Rice, beans , and 1,000 peas，too,\nend,") == "Rice beans and 1000 peas too\nend"
    assert rv.quote('"Rice grows."') == '"Rice grows."' and rv.quote("Rice grows.") == '"Rice grows."'


def test_finish_cuts_back_to_the_last_sentence_or_gives_up():
    long = "Rice is a grain that people eat all over the world every day. It grows in wet fields and"
    assert rv.finish(long) == "Rice is a grain that people eat all over the world every day."
    assert rv.finish("Rice is good. It grows in") == ""  # 3 words left < MIN_KEPT_WORDS
    assert rv.finish("no sentence end at all") == ""


def test_revise_fixes_case_end_phrase_and_commas_and_scores_higher():
    p = prompt(
        {"kind": "lowercase"}, {"kind": "end_phrase", "phrase": "Is there anything else?"}, {"kind": "no_commas"}
    )
    before = rubric.score(p, ANSWER)
    assert before.passed == [False, False, False]
    out = rv.revise(p, ANSWER)
    assert out.edits == ["end_phrase", "no_commas", "lowercase"]
    assert (
        out.text
        == "rice is a grain eaten all over the world. it grows in paddies mostly in asia. is there anything else?"
    )
    assert rubric.score(p, out.text).passed == [True, True, True]
    assert out.gold_before == before.total and out.gold_after == 1.0 > out.gold_before


def test_revise_finishes_a_cut_off_answer_then_edits_it():
    p = prompt({"kind": "uppercase"})
    cut = "Rice is a grain that people eat all over the world every day. It grows in wet fields and"
    out = rv.revise(p, cut, finished=False)
    assert out.edits == ["finish", "uppercase"] and out.finished
    assert out.text == "RICE IS A GRAIN THAT PEOPLE EAT ALL OVER THE WORLD EVERY DAY."
    assert out.gold_before == 0.0 - 0.3 and out.gold_after == 1.0


def test_revise_leaves_followed_and_unfixable_instructions_alone():
    p = prompt({"kind": "start_phrase", "phrase": "Rice"}, {"kind": "word_count", "relation": "at_most", "n": 5})
    out = rv.revise(p, ANSWER)  # starts as asked; the word count needs rewriting, not an edit
    assert out.text == ANSWER and out.edits == [] and out.gold_after == out.gold_before == 0.5


def test_revise_drops_an_edit_that_breaks_another_instruction():
    # uppercasing would break "lowercase"; both asked (a contradictory prompt): nothing can gain
    p = prompt({"kind": "lowercase"}, {"kind": "uppercase"})
    out = rv.revise(p, ANSWER)
    assert out.edits == ["lowercase"] and out.text == ANSWER.lower()  # 0.0 -> 0.5, then upper would be 0.5 again


def test_with_revisions_adds_revised_answers_after_the_samples_largest_gain_first():
    p = prompt({"kind": "lowercase"}, {"kind": "no_commas"})
    a = "rice grows in water, mostly in asia."  # lowercase already: 0.5 -> 1.0
    b = "Rice, beans and peas grow well here. They need water."  # both fixable: 0.0 -> 1.0
    c = "peas grow in water too."  # follows both: nothing to revise
    responses, finished, revised_from = rv.with_revisions(p, [a, b, c], [True, True, True])
    assert responses == [
        a,
        b,
        c,
        "rice beans and peas grow well here. they need water.",
        "rice grows in water mostly in asia.",
    ]
    assert revised_from == [None, None, None, 1, 0] and finished == [True] * 5
    # a revision that equals a sampled answer is not added twice
    responses, _, revised_from = rv.with_revisions(p, [a, "rice grows in water mostly in asia."], [True, True])
    assert len(responses) == 2 and revised_from == [None, None]


def test_with_revisions_caps_the_ranking_at_max_k_and_keeps_finished_flags():
    p = prompt({"kind": "uppercase"})
    cut = "Rice is a grain that people eat all over the world every day. It grows in wet fields and"
    others = [f"Answer number {i} about rice." for i in range(4)]
    responses, finished, revised_from = rv.with_revisions(p, [cut, *others], [False, True, True, True, True], max_k=6)
    assert len(responses) == 6 and revised_from[:5] == [None] * 5
    # every revision gains 0.5 or more; the cut-off one gains most (-0.3 -> 1.0) and comes first
    assert revised_from[5] == 0 and responses[5] == "RICE IS A GRAIN THAT PEOPLE EAT ALL OVER THE WORLD EVERY DAY."
    assert finished == [False, True, True, True, True, True]
    assert rv.with_revisions(p, others, [True] * 4, max_k=4) == (others, [True] * 4, [None] * 4)


def test_the_rewriting_edits_by_hand():
    text = "Rice is a grain, eaten all over the world. It grows in paddies. People cook it. Some steam it."
    # 9 + 4 words
    assert rv.cut_words(text, "at_most", 13) == "Rice is a grain, eaten all over the world. It grows in paddies."
    assert rv.cut_words(text, "at_most", 12) == "Rice is a grain, eaten all over the world."
    assert rv.cut_words(text, "at_most", 3) == text  # no leading sentence is short enough: unchanged
    assert rv.cut_words(text, "at_least", 3) == text
    assert rv.cut_sentences(text, "exactly", 1) == "Rice is a grain, eaten all over the world."
    assert rv.delete_words("Rice is a grain, a GRAIN indeed.", ["grain"]) == "Rice is a, a indeed."
    assert rv.regroup(text, 2, "paragraphs") == (
        "Rice is a grain, eaten all over the world. It grows in paddies.\n\nPeople cook it. Some steam it."
    )
    assert rv.regroup(text, 3, "bullets") == (
        "* Rice is a grain, eaten all over the world. It grows in paddies.\n* People cook it.\n* Some steam it."
    )
    assert rv.regroup(text, 2, "sections", "Part").startswith("Part 1\nRice is") and "\n\nPart 2\nPeople" in text.join(
        ["", rv.regroup(text, 2, "sections", "Part")]
    )
    assert rv.regroup(text, 5, "lines") == text  # 4 sentences cannot make 5 lines
    assert rv.name_keywords(text, ["rice", "water", "soil"]) == text + " This is about water and soil."
    assert rv.add_title("rice grows. It is good.") == "<<Rice grows It is>>\n\nrice grows. It is good."
    assert (
        rv.highlight(text, 2)
        == "*Rice* is a *grain*, eaten all over the world. It grows in paddies. People cook it. Some steam it."
    )
    assert rv.add_placeholders("Dear [who],", 3) == "Dear [who],\n\n[name] [date]"
    assert rv.as_json('Say "hi".') == '{"answer": "Say \\"hi\\"."}'


def test_every_rewriting_edit_makes_its_instruction_pass():
    text = "Rice is a grain, eaten all over the world. It grows in paddies. People cook it. Some steam it."
    specs = [
        {"kind": "word_count", "relation": "at_most", "n": 12},
        {"kind": "sentence_count", "relation": "exactly", "n": 2},
        {"kind": "forbidden_words", "words": ["grain", "world"]},
        {"kind": "paragraph_count", "n": 3},
        {"kind": "line_count", "n": 2},
        {"kind": "numbered_sections", "n": 2},
        {"kind": "bullet_count", "n": 4},
        {"kind": "include_keywords", "keywords": ["water"]},
        {"kind": "title"},
        {"kind": "highlights", "n": 3},
        {"kind": "placeholders", "n": 2},
        {"kind": "json_format"},
    ]
    for spec in specs:
        assert not rubric.check_instruction(spec, text)
        out = rv.revise(prompt(spec), text)
        assert out.edits == [spec["kind"]] and rubric.check_instruction(spec, out.text), spec
        assert out.gold_after == 1.0


def test_edit_set_differs_only_in_instructions():
    p = prompt(
        {"kind": "lowercase"},
        {"kind": "end_phrase", "phrase": "Any questions?"},
        {"kind": "word_count", "relation": "at_least", "n": 300},
    )
    cut = "Rice is a grain that people eat all over the world every day. It grows in wet fields and"
    done = "Rice grows in water. It is eaten in Asia."
    texts = rv.edit_set(p, [done, cut], [True, False])
    # the base with the most fixable misses (both have two: the first wins), one text per single
    # fix, then both fixes together; the unfixable word count is left alone
    assert texts == [done, done.lower(), done + " Any questions?", (done + " Any questions?").lower()]
    scores = [rubric.score(p, t, True) for t in texts]
    assert [s.followed for s in scores] == [0.0, 1 / 3, 1 / 3, 2 / 3]
    assert all(s.penalties == {} for s in scores)  # nothing else differs
    # an answer that was cut off is cut back to its last sentence first (finished, no penalty)
    texts = rv.edit_set(p, [cut], [False])
    assert texts[0] == "Rice is a grain that people eat all over the world every day." and len(texts) == 4
    # nothing fixable: no set
    assert rv.edit_set(prompt({"kind": "word_count", "relation": "at_least", "n": 300}), [done], [True]) == []
