"""The built-in task: size, instruction counts and coverage, no duplicates, a clean train/eval
split, every instruction checkable, the generator reproduces the committed files, and ideal
answers written by hand score full marks."""

from __future__ import annotations

from collections import Counter

import pytest

from rlhfkit.errors import UserError
from rlhfkit.feedback import rubric
from rlhfkit.tasks import build as task_build
from rlhfkit.tasks import load_task, task_path


@pytest.fixture(scope="module")
def train():
    return load_task("train")


@pytest.fixture(scope="module")
def evals():
    return load_task("eval")


def test_size_and_instruction_counts(train, evals):
    everything = train + evals
    assert len(everything) >= 300
    assert 0.15 <= len(evals) / len(everything) <= 0.25
    counts = Counter(len(p.meta["instructions"]) for p in everything)
    assert set(counts) == {1, 2, 3}
    for p in everything:
        assert p.messages == [{"role": "user", "content": p.text}]
        assert p.meta["id"] and p.meta["category"] and p.meta["topic_keywords"]


def test_every_kind_used_and_easy_ones_common(train, evals):
    kinds = Counter(s["kind"] for p in train + evals for s in p.meta["instructions"])
    assert set(kinds) == set(rubric.KINDS)
    easy = {"lowercase", "word_count", "end_phrase", "include_keywords", "no_commas", "start_phrase"}
    with_easy = sum(any(s["kind"] in easy for s in p.meta["instructions"]) for p in train)
    assert with_easy / len(train) > 0.6
    assert {s["kind"] for p in evals for s in p.meta["instructions"]} >= easy


def test_no_duplicates_and_disjoint_split(train, evals):
    texts = [p.text for p in train + evals]
    assert len(set(texts)) == len(texts)
    ids = [p.meta["id"] for p in train + evals]
    assert len(set(ids)) == len(ids)
    bases = task_build.parse_bases()
    request = {b["base_id"]: b["request"] for b in bases}
    assert len(bases) >= 120 and len({b["request"] for b in bases}) == len(bases)
    train_bases = {p.meta["base_id"] for p in train}
    eval_bases = {p.meta["base_id"] for p in evals}
    assert not train_bases & eval_bases
    # not even the request text of an eval prompt appears in a train prompt
    for b in eval_bases:
        assert not any(p.text.startswith(request[b]) for p in train)
    # every category is represented in both splits
    assert {p.meta["category"] for p in train} == {p.meta["category"] for p in evals}
    assert len({p.meta["category"] for p in train}) >= 12


def test_every_instruction_checkable_and_compatible(train, evals):
    for p in train + evals:
        specs = p.meta["instructions"]
        assert 1 <= len(specs) <= 3
        for s in specs:
            rubric.validate_instruction(s)
            assert isinstance(rubric.check_instruction(s, "some answer."), bool)
        assert task_build.compatible(specs), p.meta["id"]
        assert p.text.startswith(task_build.parse_bases()[p.meta["base_id"]]["request"])


def test_generator_reproduces_committed_files():
    from rlhfkit.data.jsonl import dumps_line

    train, evals = task_build.build()
    assert "".join(dumps_line(r) + "\n" for r in train) == task_path("train").read_text(encoding="utf-8")
    assert "".join(dumps_line(r) + "\n" for r in evals) == task_path("eval").read_text(encoding="utf-8")


def test_bad_split_is_a_user_error():
    with pytest.raises(UserError, match="splits"):
        load_task("test")


IDEAL = {
    "task-001-1": '```json\n{"breakfast": "overnight oats", "steps": ["mix oats with milk", "add fruit"], '
    '"minutes": 5}\n```',
    "task-012-0": "* A warm jacket for cold evenings.\n* Sturdy hiking boots.\n* Two litres of water.\n"
    "* A small first aid kit.\nGood luck!",
    "task-013-0": "Part 1\nBook your train ticket early and pick a seat by the window.\n"
    "Part 2\nBring snacks because the train may be slow. Enjoy the train journey. Good luck!",
    "task-040-1": "WHAT IS THE MONTHLY PRICE?\nHOW MANY MONTHS DOES THE CONTRACT LAST?\n"
    "IS THERE A FEE TO CANCEL?\nHOW MUCH DATA IS INCLUDED?\nDOES THE PHONE COME UNLOCKED?",
    "task-115-0": "My sock went into the laundry bright,\nand never came back out that night.\n"
    "Now one foot is cold and one is warm.\nThe end.",
    "task-132-2": "<<Leaking kitchen tap>>\n\nDear landlord, the kitchen tap has been leaking since Monday. "
    "Could you arrange a repair this week? Thank you.",
    "task-099-2": "SECTION 1\nPEOPLE CUT ICE FROM FROZEN LAKES IN WINTER.\nSECTION 2\nTHEY STORED THE ICE "
    "IN SAWDUST INSIDE ICE HOUSES.\nSECTION 3\nFOOD WAS ALSO KEPT COLD IN A DEEP CELLAR.",
    "task-027-0": "In short, a walk after lunch helps your body and your mind.\n***\nA gentle walk helps "
    "digestion and keeps your blood sugar steadier after a meal.\n***\nIt also gives you fresh air and "
    "a little energy boost so the afternoon feels less sleepy and more productive.",
    "task-039-0": "Here is a plan: work out the holiday cost, divide it by six and save that much money "
    "every month in a separate account. Is there anything else I can help with?",
}


@pytest.mark.parametrize("pid", sorted(IDEAL))
def test_hand_written_ideal_answers_score_full_marks(pid, train, evals):
    prompt = next(p for p in train + evals if p.meta["id"] == pid)
    s = rubric.score(prompt, IDEAL[pid])
    assert s.all_followed, (prompt.text, s.to_dict())
    assert s.penalties == {} and s.total == 1.0
    # and a lazy answer does not
    lazy = rubric.score(prompt, "I don't know, sorry")
    assert lazy.total < 1.0
