"""People as labelers: ranking tasks go to the preference store, people rank them in the web app
(``rlhfkit serve``), and training reads the rankings back from the store.

- ``publish``: a round's sampled answers (rows ``{id, prompt | messages, responses, finished?}``)
  become tasks of one batch; publishing again adds nothing (tasks are keyed by the prompt id).
- ``wait_for_rankings``: blocks until a batch has enough ranked tasks, printing a progress line;
  a timeout raises a UserError that says how to resume (the tasks stay published, rankings stay
  stored: rerunning the pipeline picks up where it stopped).
- ``HumanLabeler``: the ``Labeler`` interface on top of both, one task at a time (slow by nature).
- ``export``: rankings and demonstrations as JSONL and as ``datasets`` directories.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import Prompt, Ranking, ranking_row
from rlhfkit.errors import UserError
from rlhfkit.feedback.store import Store, TaskIn


def publish(store: Store, batch: str, rows: list[dict], model: str = "", labels_per_task: int = 1) -> int:
    """Publish sampled answers as ranking tasks of ``batch``; returns the number of new tasks."""
    tasks = []
    for i, row in enumerate(rows):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "responses")}
        tasks.append(
            TaskIn(
                messages=messages,
                responses=list(row["responses"]),
                models=[model] * len(row["responses"]),
                external_id=str(row.get("id", i)),
                meta=meta,
            )
        )
    return store.add_tasks(batch, tasks, labels_per_task=labels_per_task)


def wait_for_rankings(
    store: Store, batch: str, needed: int, timeout: float, poll: float = 5.0, say=print
) -> list[dict]:
    """Wait until ``needed`` tasks of ``batch`` are ranked (a progress line on every change);
    returns the batch's rankings (every ranking of every task, oldest first)."""
    start = time.monotonic()
    last = -1
    while True:
        done = store.count_ranked_tasks(batch)
        if done != last:
            total = store.count_tasks(batch)
            say(
                f"[{batch}] {done}/{needed} tasks ranked by people ({total} published; waiting "
                f"{time.monotonic() - start:.0f}/{timeout:.0f} s)"
            )
            last = done
        if done >= needed:
            return store.rankings(batch)
        if time.monotonic() - start >= timeout:
            raise UserError(
                f"timed out after {timeout:.0f} s waiting for people to rank batch {batch!r} "
                f"({done}/{needed} ranked). Rankings are kept in {store.url}: run the same "
                "command again to keep waiting (or raise human_timeout)"
            )
        time.sleep(poll)


class HumanLabeler:
    """The ``Labeler`` interface backed by the store: publishes the task, waits for a person."""

    name = "human"

    def __init__(self, store: Store, batch: str = "adhoc", timeout: float = 3600.0, poll: float = 2.0):
        self.store, self.batch, self.timeout, self.poll = store, batch, timeout, poll

    def rank(self, prompt: Prompt, responses: list[str], finished: list[bool] | None = None) -> Ranking:
        ext = str(prompt.meta.get("id", "")) or str(abs(hash((prompt.text, tuple(responses)))))
        self.store.add_tasks(
            self.batch, [TaskIn(list(prompt.messages), list(responses), external_id=ext, meta={"finished": finished})]
        )
        start = time.monotonic()
        while True:
            for r in self.store.rankings(self.batch):
                if r["meta"]["external_id"] == ext:
                    return Ranking(
                        messages=r["messages"],
                        responses=r["responses"],
                        ranks=r["ranks"],
                        meta={"labeler": r["meta"]["labeler"], "flags": r["meta"]["flags"]},
                    )
            if time.monotonic() - start >= self.timeout:
                raise UserError(f"timed out after {self.timeout:.0f} s waiting for a person to rank task {ext!r}")
            time.sleep(self.poll)


def export(store: Store, out: str | Path) -> dict[str, str]:
    """Write ``rankings.jsonl``, ``demonstrations.jsonl`` and ``datasets/{rankings,demonstrations}``
    (``Dataset.save_to_disk``; ``rlhfkit rm --data OUT/datasets/rankings`` reads it). Returns the paths."""
    import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("rankings", store.rankings()), ("demonstrations", store.demonstrations())):
        path = out / f"{name}.jsonl"
        write_jsonl(path, rows)
        paths[name] = str(path)
        flat = [{**r, "meta": json.dumps(r["meta"], ensure_ascii=False)} for r in rows]  # Arrow needs one schema
        if name == "rankings":
            flat = [r for r in flat if len(set(r["ranks"])) > 1]  # an all-tied ranking teaches nothing
        ds_dir = out / "datasets" / name
        if flat:
            datasets.Dataset.from_list(flat).save_to_disk(str(ds_dir))
            paths[f"datasets/{name}"] = str(ds_dir)
    return paths


def rank_round_by_people(
    store: Store,
    batch: str,
    prompts: list[Prompt],
    samples: list[dict],
    needed: int,
    timeout: float,
    poll: float = 5.0,
    fallback=None,
    say=print,
) -> list[dict]:
    """The pipeline's labeling step with people: publish the round's K answers per prompt as tasks of
    ``batch``, wait until ``needed`` tasks are ranked, and return ranking rows in the pipeline's format
    (``{prompt, responses, ranks, meta}``; ``meta["gold"]`` is the gold rubric of each answer, for the
    report). With a ``fallback`` labeler (``labeler=mix``) prompts nobody ranked are ranked by it;
    without one they are left out. A ranking that ties every answer carries no preference: left out."""
    from rlhfkit.feedback import rubric

    publish(store, batch, samples, model=batch)
    got: dict[str, list[dict]] = {}
    for r in wait_for_rankings(store, batch, min(needed, len(samples)), timeout, poll, say):
        got.setdefault(r["meta"]["external_id"], []).append(r)
    rows = []
    for i, (p, s) in enumerate(zip(prompts, samples)):
        gold = [rubric.score(p, a, f).total for a, f in zip(s["responses"], s["finished"])]
        people = [r for r in got.get(str(s.get("id", i)), []) if len(set(r["ranks"])) > 1]
        for r in people:
            rows.append(
                {
                    "prompt": p.text,
                    "responses": r["responses"],
                    "ranks": r["ranks"],
                    "meta": {
                        "labeler": r["meta"]["labeler"],
                        "gold": gold,
                        "flags": r["meta"]["flags"],
                        "task_id": r["meta"]["task_id"],
                        "prompt_id": p.meta.get("id"),
                    },
                }
            )
        if not people and fallback is not None:
            rk = fallback.rank(p, s["responses"], s["finished"])
            rows.append(ranking_row(p, rk))
    say(
        f"[{batch}] {sum(r['meta']['labeler'] != getattr(fallback, 'name', None) for r in rows)} rankings by people"
        + (
            f", {sum(r['meta']['labeler'] == fallback.name for r in rows)} by the {fallback.name} labeler"
            if fallback
            else ""
        )
    )
    return rows
