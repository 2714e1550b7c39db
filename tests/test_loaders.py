"""Loaders: every source format, every schema, field mapping, HH parsing, errors and their exact
messages, skip_invalid, and the real data sets in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rlhfkit.data.hh import HHFormatError, parse_hh, shared_prefix, split_last_response
from rlhfkit.data.loaders import InvalidRecord, load_records, parse_record
from rlhfkit.data.records import Demonstration, Prompt, Ranking
from rlhfkit.errors import UserError

FIX = Path(__file__).parent / "data"
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def error(source, kind, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_records(str(source), kind, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# HH text


def test_parse_hh_multi_turn_exact_messages():
    text = (
        "\n\nHuman: Hi there\n\nAssistant: Hello!  \n\nHuman: How are you?\n\n  Fine,\n\nthanks.\n\nAssistant: Good.\n"
    )
    assert parse_hh(text) == [U("Hi there"), A("Hello!"), U("How are you?\n\n  Fine,\n\nthanks."), A("Good.")]
    # leading whitespace, and the first marker without its blank line
    assert parse_hh("  Human: a\n\nAssistant: b  ") == [U("a"), A("b")]
    assert split_last_response(parse_hh(text)) == (
        [U("Hi there"), A("Hello!"), U("How are you?\n\n  Fine,\n\nthanks.")],
        "Good.",
    )


def test_parse_hh_errors():
    with pytest.raises(HHFormatError, match=r"must start with 'Human:', starts with 'Assistant:'"):
        parse_hh("\n\nAssistant: hi\n\nHuman: x")
    with pytest.raises(HHFormatError, match=r"must start with 'Human:', starts with 'Hello'"):
        parse_hh("Hello\n\nHuman: x")
    with pytest.raises(HHFormatError, match=r"^HH text is empty$"):
        parse_hh(" \n ")
    with pytest.raises(HHFormatError, match=r"turn 3 \(Human\) is empty"):
        parse_hh("\n\nHuman: a\n\nAssistant: b\n\nHuman:   \n\nAssistant: c")
    with pytest.raises(HHFormatError, match=r"the last Assistant turn \(turn 2, the response\) is empty"):
        parse_hh("\n\nHuman: a\n\nAssistant: ")
    assert parse_hh("\n\nHuman: a\n\nAssistant: ", allow_empty_last=True) == [U("a"), A("")]


def test_hh_consecutive_assistant_turns_are_one_response():
    msgs = parse_hh("\n\nHuman: joke?\n\nAssistant: Here is one:\n\nAssistant: knock knock")
    assert msgs == [U("joke?"), A("Here is one:"), A("knock knock")]
    assert split_last_response(msgs) == ([U("joke?")], "Here is one:\n\nAssistant: knock knock")


def test_shared_prefix():
    a = parse_hh("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: good")
    b = parse_hh("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: bad")
    assert shared_prefix(a, b) == ([U("A"), A("B"), U("C")], "good", "bad")
    # diverging before the last turn: the rest of each transcript is its response
    c = parse_hh("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: good\n\nHuman: D\n\nAssistant: E")
    assert shared_prefix(c, b) == ([U("A"), A("B"), U("C")], "good\n\nHuman: D\n\nAssistant: E", "bad")
    with pytest.raises(HHFormatError, match=r"do not share a prompt \(they differ from turn 1\)"):
        shared_prefix(parse_hh("Human: x\n\nAssistant: y"), parse_hh("Human: z\n\nAssistant: y"))


def test_hh_rankings_fixture():
    res = load_records(FIX / "hh_edge.jsonl", "ranking", skip_invalid=True)
    r1, r2, r3 = res.records
    assert (r1.messages, r1.responses, r1.ranks) == ([U("Hi")], ["Hello", "Go away"], [0, 1])
    assert r2.messages == [U("A"), A("B"), U("C")] and r2.responses == ["good\n\nHuman: D\n\nAssistant: E", "bad"]
    assert r3.responses == ["", "Ok"]  # an empty final Assistant turn is an answer the model gave
    assert res.skipped == [
        (
            f"{FIX}/hh_edge.jsonl:4",
            "fields 'chosen'/'rejected': the two conversations do not share a prompt (they differ from turn 1)",
        ),
        (f"{FIX}/hh_edge.jsonl:5", "field 'chosen': HH text must start with 'Human:', starts with 'Assistant:'"),
        (f"{FIX}/hh_edge.jsonl:6", "field 'chosen': turn 1 (Human) is empty"),
    ]
    assert error(FIX / "hh_edge.jsonl", "ranking") == (
        f"{FIX}/hh_edge.jsonl:4: fields 'chosen'/'rejected': "
        "the two conversations do not share a prompt (they differ from turn 1)"
    )


def test_hh_as_demonstrations_and_prompts(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
         "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: bad"},
        {"text": "\n\nHuman: Q\n\nAssistant: R"},
        {"text": "\n\nHuman: Only a question"},
    ])  # fmt: skip
    demos = load_records(src, "demonstration", limit=2).records
    assert [(d.messages, d.response) for d in demos] == [([U("A"), A("B"), U("C")], "D"), ([U("Q")], "R")]
    assert demos[0].meta == {"location": f"{src}:1"}  # the rejected half is not carried along
    prompts = load_records(src, "prompt").records
    assert [p.messages for p in prompts] == [[U("A"), A("B"), U("C")], [U("Q")], [U("Only a question")]]
    assert error(src, "demonstration") == (
        f"{src}:3: field 'text': expected the conversation to end with an Assistant turn (the response)"
    )


# ---------------------------------------------------------------------------------------------
# schemas


def test_demonstration_schemas(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello"), U("Bye?")]
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "P1", "response": "R1", "id": 7},
        {"messages": msgs + [A("Bye.")]},
        {"prompt": msgs, "response": "Bye!"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Count to 2", "input": "", "output": "1 2"},
        {"instruction": "Sort", "instances": [{"input": "b a", "output": "a b"}, {"input": "", "output": "nothing"}]},
        {"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]},
    ])  # fmt: skip
    res = load_records(src, "demonstration", skip_invalid=True)
    got = [(d.messages, d.response) for d in res.records]
    assert got == [
        ([U("P1")], "R1"),
        (msgs, "Bye."),
        (msgs, "Bye!"),
        ([U("Translate\n\nchat")], "cat"),
        ([U("Count to 2")], "1 2"),
        ([U("Sort\n\nb a")], "a b"),
        ([U("Sort")], "nothing"),
    ]
    assert res.records[0].meta == {"id": 7, "location": f"{src}:1"}
    assert res.records[6].meta == {"instance": 1, "location": f"{src}:6"}
    # ShareGPT-style turns are read under a mapped messages field
    (d,) = load_records(src, "demonstration", fields={"messages": "conversations"}, skip_invalid=True).records
    assert (d.messages, d.response) == ([U("hey")], "yo")


def test_ranking_schemas_and_ties(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "responses": ["a", "b", "c", "d"]},
        {"prompt": "Q", "responses": ["w", "x", "y", "z"], "ranks": [3, 1, 1, 2]},
        {"messages": [U("Q")], "chosen": "good", "rejected": "bad"},
        {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]},
        {"chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")]},
        {"prompt": "\n\nHuman: Q\n\nAssistant:", "chosen": " good", "rejected": " bad"},
    ])  # fmt: skip
    r = load_records(src, "ranking").records
    assert all(isinstance(x, Ranking) for x in r)
    assert (r[0].responses, r[0].ranks, r[0].pairs()[:3]) == (
        ["a", "b", "c", "d"],
        [0, 1, 2, 3],
        [(0, 1), (0, 2), (0, 3)],
    )
    # re-ordered best first, ranks renumbered densely, the tie makes no pair
    assert (r[1].responses, r[1].ranks) == (["x", "y", "z", "w"], [0, 0, 1, 2])
    assert len(r[1].pairs()) == 5 and (0, 1) not in r[1].pairs() and (1, 0) not in r[1].pairs()
    for x in r[2:5]:
        assert (x.messages, x.responses, x.ranks) == ([U("Q")], ["good", "bad"], [0, 1])
    assert (r[5].messages, r[5].responses) == ([U("Q")], ["good", "bad"])  # continuations of an HH prompt, stripped


def test_ranking_meta_lists_follow_the_reordered_responses(tmp_path):
    """A row's meta object may describe each response (our labelers write ``gold``, one score per
    response, in the sampled order); after the best-first re-ordering entry i still belongs to
    response i. Lists of another length and scalars are left as they are."""
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "responses": ["w", "x", "y", "z"], "ranks": [3, 1, 1, 2],
         "meta": {"gold": [-1.0, 0.9, 0.8, 0.1], "finished": [False, True, True, True], "tags": ["a", "b"], "seed": 3}},
        {"prompt": "Q", "responses": ["a", "b"], "meta": {"gold": [0.5, 0.2]}},
    ])  # fmt: skip
    r = load_records(src, "ranking").records
    assert r[0].responses == ["x", "y", "z", "w"]
    assert r[0].meta["gold"] == [0.9, 0.8, 0.1, -1.0] and r[0].meta["finished"] == [True, True, True, False]
    assert r[0].meta["tags"] == ["a", "b"] and r[0].meta["seed"] == 3
    assert r[1].meta["gold"] == [0.5, 0.2]


def test_prompt_schemas(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "plain"},
        {"messages": [U("a"), A("b"), U("c"), A("answer to drop")]},
        {"instruction": "Do it", "input": "now"},
        {"prompt": "\n\nHuman: hh prompt\n\nAssistant:"},
        {"prompt": "Q", "chosen": "x", "rejected": "y"},
    ])  # fmt: skip
    got = [p.messages for p in load_records(src, "prompt").records]
    assert got == [[U("plain")], [U("a"), A("b"), U("c")], [U("Do it\n\nnow")], [U("hh prompt")], [U("Q")]]


def test_message_validation(tmp_path):
    cases = [
        ({"messages": [{"role": "robot", "content": "x"}, A("y")]},
         "field 'messages[0].role': expected one of system, user, assistant, got 'robot'"),
        ({"messages": [U("x"), {"role": "assistant", "content": ""}]},
         "field 'messages[1].content': expected a non-empty string, got an empty string"),
        ({"messages": [U("x"), {"role": "system", "content": "s"}, A("y")]},
         "field 'messages[1].role': a system turn may only come first"),
        ({"messages": [U("x"), U("y")]},
         "field 'messages': expected the conversation to end with an assistant turn (the response)"),
        ({"messages": "hello"}, "field 'messages': expected a non-empty list, got 'hello'"),
        ({"messages": [A("y"), A("z")]}, "field 'messages': expected at least one user turn"),
        ({"prompt": [U("q"), A("a")], "response": "r"},
         "field 'prompt': expected the prompt to end with a user turn, got 'assistant'"),
    ]  # fmt: skip
    for row, msg in cases:
        with pytest.raises(InvalidRecord) as e:
            parse_record(row, "demonstration")
        assert str(e.value) == msg


def test_unknown_schema_and_kind(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"foo": 1, "bar": None, "baz": "z"}])
    assert error(src, "ranking") == (
        f"{src}:1: cannot tell the record type: expected fields prompt+responses, prompt+chosen+rejected, "
        "or chosen+rejected (HH text) (found: foo, baz)"
    )
    assert "expected fields instruction+instances, messages, prompt+response" in error(src, "demonstration")
    assert error(src, "text") == f"{src}:1: cannot tell the record type: expected fields text (found: foo, baz)"
    assert error(src, "pairs") == "unknown record kind 'pairs'; expected one of demonstration, ranking, prompt, text"


def test_ranks_validation(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "responses": ["a", "b"], "ranks": [0, 0]},
        {"prompt": "Q", "responses": ["a", "b"], "ranks": [0]},
        {"prompt": "Q", "responses": ["a"]},
        {"prompt": "Q", "responses": ["a", None]},
    ])  # fmt: skip
    with pytest.raises(UserError, match="no valid ranking record"):
        load_records(src, "ranking", skip_invalid=True)
    reasons = [parse_error(r) for r in map(json.loads, Path(src).read_text().splitlines())]
    assert reasons == [
        "field 'ranks': all responses are tied, so there is no pair to learn from",
        "field 'ranks': expected 2 integers (one rank per response), got [0]",
        "field 'responses': expected at least 2 responses, got 1",
        "field 'responses[1]': expected a string, got null",
    ]


def parse_error(row: dict, kind: str = "ranking") -> str:
    with pytest.raises(InvalidRecord) as e:
        parse_record(row, kind)
    return str(e.value)


def test_self_instruct_errors():
    row = {"instruction": "Do", "instances": [{"input": "a", "output": "b"}, {"input": "c", "output": None}]}
    assert parse_error(row, "demonstration") == "field 'instances[1].output': expected a non-empty string, got null"
    assert parse_error({"instruction": "Do", "instances": []}, "demonstration") == (
        "field 'instances': expected a non-empty list, got an empty list"
    )


# ---------------------------------------------------------------------------------------------
# field mapping


def test_field_mapping(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [
        {"instruction": "Say hi", "output": "hi", "prompt": "ignored: mapped away"},
        {"instruction": "Say bye", "output": None},
    ])  # fmt: skip
    fields = {"prompt": "instruction", "response": "output"}
    res = load_records(src, "demonstration", fields=fields, skip_invalid=True)
    assert [(d.messages, d.response) for d in res.records] == [([U("Say hi")], "hi")]
    assert res.skipped == [(f"{src}:2", "field 'output': expected a non-empty string, got null")]  # the user's name

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": "Q", "pos": "good", "neg": "bad"}, {"q": "Q", "pos": "good"}])
    fields = {"prompt": "q", "chosen": "pos", "rejected": "neg"}
    res = load_records(pairs, "ranking", fields=fields, skip_invalid=True)
    assert res.records[0].responses == ["good", "bad"]
    assert res.skipped == [(f"{pairs}:2", "missing field 'neg' (mapped to 'rejected')")]

    nested = write_jsonl(
        tmp_path / "rtp.jsonl", [{"prompt": {"text": "So I said", "toxicity": 0.9}, "challenging": True}]
    )
    (p,) = load_records(nested, "prompt", fields={"prompt": "prompt.text"}).records
    assert p.messages == [U("So I said")] and p.meta["challenging"] is True
    assert (
        error(nested, "prompt") == f"{nested}:1: field 'prompt': expected a string or a list of messages, got an object"
    )
    assert error(nested, "prompt", fields={"promt": "x"}).startswith(
        "fields: unknown field 'promt'; expected one of prompt,"
    )


# ---------------------------------------------------------------------------------------------
# source formats

ROWS = [{"prompt": "Q1", "chosen": "a", "rejected": "b"}, {"prompt": "Q2", "chosen": "c", "rejected": "d"}]


def check_pairs(records):
    assert [(r.messages, r.responses) for r in records] == [([U("Q1")], ["a", "b"]), ([U("Q2")], ["c", "d"])]


def test_json_list_and_json_lines_in_json(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ROWS, indent=2))
    res = load_records(tmp_path / "l.json", "ranking")
    check_pairs(res.records)
    assert [r.meta["location"] for r in res.records] == [f"{tmp_path}/l.json:2", f"{tmp_path}/l.json:7"]
    datasets.Dataset.from_list(ROWS).to_json(tmp_path / "dump.json")  # writes JSON Lines
    check_pairs(load_records(tmp_path / "dump.json", "ranking").records)


def test_csv_tsv_and_gzip(tmp_path):
    import gzip

    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nQ1,a,b\nQ2,c,d\n")
    check_pairs(load_records(tmp_path / "p.csv", "ranking").records)
    (tmp_path / "p.tsv").write_text("prompt\tchosen\trejected\nQ1\ta\tb\nQ2\tc\td\n")
    check_pairs(load_records(tmp_path / "p.tsv", "ranking").records)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    check_pairs(load_records(tmp_path / "p.jsonl.gz", "ranking").records)
    # list fields in a CSV cell are JSON
    (tmp_path / "k.csv").write_text('prompt,responses,ranks\nQ,"[""a"", ""b"", ""c""]","[0, 1, 1]"\n')
    (r,) = load_records(tmp_path / "k.csv", "ranking").records
    assert (r.responses, r.ranks) == (["a", "b", "c"], [0, 1, 1])


def test_parquet(tmp_path):
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "p.parquet")
    res = load_records(tmp_path / "p.parquet", "ranking")
    check_pairs(res.records)
    assert res.records[1].meta["location"] == f"{tmp_path}/p.parquet record 1"


def test_saved_dataset_dirs(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    res = load_records(tmp_path / "ds", "ranking")
    check_pairs(res.records)
    assert res.records[1].meta["location"] == f"{tmp_path}/ds[train] record 1"

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[1:])})
    dd.save_to_disk(tmp_path / "dd")
    assert len(load_records(tmp_path / "dd", "ranking").records) == 2
    (r,) = load_records(tmp_path / "dd", "ranking", split="test").records
    assert r.responses == ["c", "d"]
    assert error(tmp_path / "dd", "ranking", split="dev") == f"{tmp_path}/dd: no split 'dev' (found: train, test)"

    # absent columns of a mixed dataset come back as None and do not confuse the schema detection
    mixed = [
        {"prompt": "Q", "response": "R", "messages": None},
        {"prompt": None, "response": None, "messages": [U("x"), A("y")]},
    ]
    datasets.Dataset.from_list(mixed).save_to_disk(tmp_path / "mixed")
    got = load_records(tmp_path / "mixed", "demonstration").records
    assert [(d.messages, d.response) for d in got] == [([U("Q")], "R"), ([U("x")], "y")]

    bad = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": None, "rejected": "b"}]
    datasets.Dataset.from_list(bad).save_to_disk(tmp_path / "bad")
    assert (
        error(tmp_path / "bad", "ranking")
        == f"{tmp_path}/bad[train] record 1: field 'chosen': expected a non-empty string, got null"
    )


def test_folder_of_data_files(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS)
    write_jsonl(d / "test.jsonl", ROWS[:1])
    check_pairs(load_records(d, "ranking").records)
    assert len(load_records(d, "ranking", split="test").records) == 1
    assert error(d, "ranking", split="validation") == f"{d}: no split 'validation' (found: train, test)"
    (tmp_path / "nothing").mkdir()
    assert "directory holds no data files" in error(tmp_path / "nothing", "ranking")


def test_hub_name(monkeypatch, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[1:])
    real = datasets.load_dataset
    calls = []

    def fake_hub(name, config=None, *, split):
        calls.append((name, config, split))
        files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
        return real("json", data_files=files, split=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    check_pairs(load_records("someone/prefs", "ranking").records)
    res = load_records("someone/prefs:v2", "ranking", split="test")
    assert (
        res.records[0].responses == ["c", "d"] and res.records[0].meta["location"] == "someone/prefs:v2[test] record 0"
    )
    assert calls == [("someone/prefs", None, "train"), ("someone/prefs", "v2", "test")]

    def offline(name, config=None, *, split):
        raise ConnectionError("Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert error("someone/missing", "ranking") == (
        "someone/missing: not a local file or directory, and loading it from the hub failed: "
        "ConnectionError: Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)"
    )


def test_missing_and_unsupported_files(tmp_path):
    assert error("data/nope.jsonl", "ranking") == "data/nope.jsonl: no such file"
    assert error("./nope", "ranking") == "./nope: no such file"
    (tmp_path / "x.xlsx").write_text("?")
    assert "unsupported file type '.xlsx'" in error(tmp_path / "x.xlsx", "ranking")
    (tmp_path / "t.txt").write_text("hello")
    assert (
        error(tmp_path / "t.txt", "ranking")
        == f"{tmp_path}/t.txt: a .txt file is plain text, which only kind 'text' reads (not 'ranking')"
    )


def test_text_kind(tmp_path):
    (tmp_path / "c.txt").write_text("Para one.\n\nPara two.\n")
    assert load_records(tmp_path / "c.txt", "text").records == ["Para one.\n\nPara two.\n"]  # one document
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "doc a"}, {"body": "doc b"}])
    assert load_records(src, "text", skip_invalid=True).records == ["doc a"]
    assert load_records(src, "text", fields={"text": "body"}, skip_invalid=True).records == ["doc b"]
    assert parse_error({"text": ""}, "text") == "field 'text': expected a non-empty string, got an empty string"
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert error(tmp_path / "blank.txt", "text") == f"{tmp_path}/blank.txt: empty (no records)"


# ---------------------------------------------------------------------------------------------
# malformed fixtures: exact messages, skip_invalid counts and reasons


def test_malformed_jsonl():
    src = FIX / "rankings_bad.jsonl"
    assert error(src, "ranking") == f"{src}:3: not valid JSON (Expecting ',' delimiter at column 32)"
    res = load_records(src, "ranking", skip_invalid=True)
    assert [r.meta["location"] for r in res.records] == [f"{src}:1", f"{src}:8"]
    assert (res.records[1].responses, res.records[1].ranks) == (["a", "b", "c"], [0, 1, 1])
    assert res.skipped == [
        (f"{src}:3", "not valid JSON (Expecting ',' delimiter at column 32)"),
        (f"{src}:4", "field 'chosen': expected a non-empty string, got null"),
        (f"{src}:5", "cannot tell the record type: expected fields prompt+responses, prompt+chosen+rejected, "
                     "or chosen+rejected (HH text) (found: foo, bar)"),
        (f"{src}:6", "field 'ranks': all responses are tied, so there is no pair to learn from"),
        (f"{src}:7", "field 'messages[0].role': expected one of system, user, assistant, got 'robot'"),
        (f"{src}:9", "expected a JSON object, got a list"),
        (f"{src}:10", "field 'chosen': expected a non-empty string, got an empty string"),
    ]  # fmt: skip
    assert res.summary() == (
        f"loaded 2 rankings from {src}; skipped 7 (1 × not valid JSON (Expecting ',' delimiter at column 32), "
        "1 × field 'chosen': expected a non-empty string, got null, 1 × cannot tell the record type: expected fields "
        "prompt+responses, prompt+chosen+rejected, or chosen+rejected (HH text) (found: foo, bar), 4 × other reasons)"
    )


def test_malformed_csv():
    src = FIX / "rankings_bad.csv"
    assert error(src, "ranking") == f"{src}:5: field 'chosen': expected a non-empty string, got an empty string"
    res = load_records(src, "ranking", skip_invalid=True)
    # line numbers count the physical lines: row 2 spans lines 3-4, a blank line 7 is no record
    assert [r.meta["location"] for r in res.records] == [f"{src}:2", f"{src}:3", f"{src}:8"]
    assert res.records[1].messages == [U("A prompt\nover two lines")]
    assert res.skipped == [
        (f"{src}:5", "field 'chosen': expected a non-empty string, got an empty string"),
        (f"{src}:6", "row has 4 fields, the header has 3"),
    ]


def test_malformed_json():
    src = FIX / "demos_bad.json"
    assert error(src, "demonstration") == f"{src}:7: field 'response': expected a non-empty string, got null"
    res = load_records(src, "demonstration", skip_invalid=True)
    assert [r.meta["location"] for r in res.records] == [f"{src}:2", f"{src}:3", f"{src}:11"]
    assert res.summary() == (
        f"loaded 3 demonstrations from {src}; skipped 1 (1 × field 'response': expected a non-empty string, got null)"
    )
    # a broken .json file cannot be skipped record by record
    broken = FIX / "broken.json"
    assert (
        error(broken, "demonstration", skip_invalid=True)
        == f"{broken}:4: not valid JSON (Expecting ',' delimiter at column 3)"
    )


def test_not_utf8(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    assert (
        error(tmp_path / "b.jsonl", "ranking")
        == f"{tmp_path}/b.jsonl:2: not UTF-8 text (invalid start byte at column 13)"
    )
    (tmp_path / "b.csv").write_bytes(b"prompt,chosen,rejected\nQ,a,b\nQ,\xff,b\n")
    assert error(tmp_path / "b.csv", "ranking") == f"{tmp_path}/b.csv:3: not UTF-8 text (invalid start byte at byte 31)"


def test_empty_and_all_invalid(tmp_path):
    assert error(FIX / "empty.jsonl", "ranking") == f"{FIX}/empty.jsonl: empty (no records)"
    (tmp_path / "e.csv").write_text("prompt,chosen,rejected\n")
    assert error(tmp_path / "e.csv", "ranking") == f"{tmp_path}/e.csv: empty (no records)"
    (tmp_path / "e.json").write_text("[]")
    assert error(tmp_path / "e.json", "ranking") == f"{tmp_path}/e.json: empty (no records)"
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q"}, {"prompt": "Q"}])
    assert error(src, "ranking", skip_invalid=True) == (
        f"{src}: no valid ranking record; skipped 2 (2 × cannot tell the record type: expected fields "
        "prompt+responses, prompt+chosen+rejected, or chosen+rejected (HH text) (found: prompt))"
    )


def test_limit(tmp_path):
    src = write_jsonl(
        tmp_path / "l.jsonl", [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"} for i in range(10)] + [{"bad": 1}]
    )
    res = load_records(src, "ranking", limit=3)
    assert [r.messages[0]["content"] for r in res.records] == ["Q0", "Q1", "Q2"]
    assert res.summary() == f"loaded 3 rankings from {src} (limit 3)"
    assert "limit: expected a positive integer" in error(src, "ranking", limit=0)


# ---------------------------------------------------------------------------------------------
# the real data sets


def test_real_hh_rankings(shared_data):
    train = load_records(shared_data / "hh-rlhf-harmless" / "train.jsonl", "ranking")
    assert len(train.records) == 1850 and not train.skipped
    assert all(r.k == 2 and r.ranks == [0, 1] and r.messages[-1]["role"] == "user" for r in train.records)
    first = json.loads((shared_data / "hh-rlhf-harmless" / "train.jsonl").read_text().splitlines()[0])
    assert train.records[0].messages == parse_hh(first["chosen"])[:-1]
    assert train.records[0].responses == [
        parse_hh(first["chosen"])[-1]["content"],
        parse_hh(first["rejected"])[-1]["content"],
    ]
    assert train.summary() == f"loaded 1,850 rankings from {shared_data}/hh-rlhf-harmless/train.jsonl"
    test = load_records(shared_data / "hh-rlhf-harmless" / "test.jsonl", "ranking")
    assert len(test.records) == 462
    prompts = load_records(shared_data / "hh-rlhf-harmless" / "test.jsonl", "prompt").records
    assert len(prompts) == 462 and all(isinstance(p, Prompt) for p in prompts)
    assert [p.messages for p in prompts] == [r.messages for r in test.records]


def test_real_self_instruct(shared_data):
    path = shared_data / "self-instruct-seed" / "seed_tasks.jsonl"
    tasks = [json.loads(line) for line in path.read_text().splitlines()]
    n_instances = sum(len(t["instances"]) for t in tasks)
    res = load_records(path, "demonstration")
    assert len(res.records) == n_instances == 175 and not res.skipped
    assert all(isinstance(d, Demonstration) and d.response.strip() for d in res.records)
    t = next(t for t in tasks if t["instances"][0]["input"])
    d = next(d for d in res.records if d.meta["id"] == t["id"])
    assert d.messages == [U(t["instruction"].strip() + "\n\n" + t["instances"][0]["input"].strip())]
    assert d.response == t["instances"][0]["output"] and d.meta["name"] == t["name"]


def test_real_tinyshakespeare(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    (doc,) = load_records(path, "text").records
    assert doc == path.read_text() and len(doc) == 1115394
