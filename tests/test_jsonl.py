"""JSON Lines through every writer and reader (rlhfkit/data/jsonl.py): any Unicode in any string
comes back equal, one record per line; lone surrogates are refused; bad lines are reported with
file, line and column; a bad data file stops a stage before its model loads."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.data.jsonl import append_jsonl, dumps_line, read_jsonl, write_jsonl
from rlhfkit.errors import UserError

# every character that some line splitter takes for a line break, and the other C0 controls
BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00\x1f\t"
TEXT = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(BREAKS)), max_size=30)  # any valid Unicode
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
RECORDS = st.lists(st.dictionaries(TEXT, VALUES, max_size=5), max_size=6)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_one_record_per_line(path, n: int) -> None:
    """n lines, whatever splitter a reader uses: no raw U+2028/U+2029/U+0085/control character."""
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == n and len(text.splitlines()) == n


@FAST
@given(rows=RECORDS)
def test_write_then_read_gives_the_same_records(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert_one_record_per_line(path, len(rows))
    path.unlink()
    for row in rows:
        append_jsonl(path, row)
    assert (read_jsonl(path) if rows else []) == rows
    if rows:
        assert_one_record_per_line(path, len(rows))


@FAST
@given(prompt=TEXT.filter(str.strip), response=TEXT.filter(str.strip), note=TEXT)
def test_the_loaders_read_what_the_pipeline_writes(tmp_path, prompt, response, note):
    from rlhfkit.data.loaders import load_records

    path = tmp_path / "demos.jsonl"
    write_jsonl(path, [{"prompt": prompt, "response": response, "note": note}, {"prompt": "q", "response": "a"}])
    got = load_records(str(path), "demonstration").records
    assert len(got) == 2 and got[0].response == response and got[0].messages[-1]["content"] == prompt


@FAST
@given(text=TEXT)
def test_metrics_log_and_resume_keep_each_line(tmp_path, text):
    from rlhfkit.recipes.common import MetricsLog, read_metrics

    class OneProcess:  # what MetricsLog needs of an Accelerator: the main process, no trackers
        is_main_process, log_with, trackers = True, [], []

    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    from rlhfkit.config import SFTConfig

    log = MetricsLog(out, OneProcess(), SFTConfig(out=str(out)))
    for step in (1, 2, 3):
        log.log(step, loss=0.5 * step, note=text)
    assert [(m["step"], m["note"]) for m in read_metrics(out)] == [(1, text), (2, text), (3, text)]
    MetricsLog(out, OneProcess(), SFTConfig(out=str(out)), resume_step=2)  # a resumed run drops step 3
    assert [(m["step"], m["loss"], m["note"]) for m in read_metrics(out)] == [(1, 0.5, text), (2, 1.0, text)]
    (out / "metrics.jsonl").unlink()


def test_the_store_exports_what_people_typed(tmp_path):
    """Rankings and better answers with line separators go through the store, both exports and back."""
    from rlhfkit.feedback.human import export
    from rlhfkit.feedback.store import Store, TaskIn

    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    ann, _ = store.create_user("ann", password="ann-password")
    odd = "line\u2028next\u2029para\x85nel\x0bvt\x1crs\r\nend"
    store.add_tasks("b", [TaskIn([{"role": "user", "content": f"q {odd}"}], [f"a {odd}", "b", ""], external_id="1")])
    task = store.next_task(ann)
    store.add_ranking(ann, task.id, [1, 0, 2], "key-1", better_answer=f"better {odd}")
    paths = export(store, tmp_path / "out")
    rankings, demos = read_jsonl(paths["rankings"]), read_jsonl(paths["demonstrations"])
    assert rankings == store.rankings() and demos == store.demonstrations()
    assert rankings[0]["responses"] == [f"a {odd}", "b", ""] and demos[0]["response"] == f"better {odd}"
    for name in ("rankings", "demonstrations"):
        assert_one_record_per_line(tmp_path / "out" / f"{name}.jsonl", 1)
    from rlhfkit.data.loaders import load_records

    ranking = load_records(paths["rankings"], "ranking").records[0]
    assert ranking.responses == ["b", f"a {odd}", ""] and ranking.messages[-1]["content"] == f"q {odd}"  # best first


def test_lone_surrogates_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(UserError, match="lone surrogate U\\+D800"):
        write_jsonl(path, [{"a": 2}, {"text": "ok \ud800 not"}])
    assert read_jsonl(path) == [{"a": 1}]  # the old file stays whole
    with pytest.raises(UserError, match="U\\+DC00"):
        append_jsonl(path, {"text": "\udc00"})
    assert read_jsonl(path) == [{"a": 1}]


def test_escapes_keep_the_text_readable():
    line = dumps_line({"t": "héllo 世界 \u2028 \x85"})
    assert line == '{"t": "héllo 世界 \\u2028 \\u0085"}' and json.loads(line) == {"t": "héllo 世界 \u2028 \x85"}


def test_bad_lines_name_file_line_and_column_once(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": "tab\there"}\n')
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}:3: not valid JSON (Invalid control character at column 11)"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(UserError, match=":2: not UTF-8 text \\(invalid start byte at column 8\\)"):
        read_jsonl(path)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "pretrain"])
def test_a_bad_data_file_stops_a_stage_before_its_model_loads(stage, tmp_path, tiny_path):
    from rlhfkit.config import PPOConfig, PretrainConfig, RewardConfig, SFTConfig

    data = tmp_path / "data.jsonl"
    data.write_text('\n{"prompt": "bad\tone"}\n')
    cls, module = {
        "sft": (SFTConfig, "sft"),
        "rm": (RewardConfig, "reward"),
        "ppo": (PPOConfig, "ppo"),
        "pretrain": (PretrainConfig, "pretrain"),
    }[stage]
    cfg = (
        cls(model=tiny_path, data=str(data), out=str(tmp_path / "out"), reward_model=tiny_path)
        if stage == "ppo"
        else cls(model=tiny_path, data=str(data), out=str(tmp_path / "out"))
    )
    train = getattr(
        __import__(f"rlhfkit.recipes.{module}", fromlist=["x"]),
        {"sft": "train_sft", "rm": "train_reward_model", "ppo": "train_ppo", "pretrain": "train_pretrain"}[stage],
    )
    loader = "load_reward_model" if stage == "rm" else "load_causal_lm"
    where = "ppo_models" if stage == "ppo" else module  # PPO loads its models in recipes/ppo_models.py
    with mock.patch(f"rlhfkit.recipes.{where}.{loader}", side_effect=AssertionError("the model was loaded first")):
        with pytest.raises(UserError, match=r"data.jsonl:2: not valid JSON \(Invalid control character at column 16\)"):
            train(cfg)
