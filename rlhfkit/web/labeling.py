"""The labeling queue: one task at a time (a prompt and K answers), ranked best to worst.

Answers are shown in an order shuffled per labeler and task (stable across reloads) and without
model names. The page (static/label.js) orders them by drag and drop or by keyboard, marks ties,
flags answers, takes an optional better answer (stored as a demonstration) and posts JSON here:

    POST /api/tasks/{id}/ranking  {"ranks": [...], "flags": [{"answer": 2, "kind": "harmful"}],
                                   "better_answer": "", "idempotency_key": "…"}

``ranks[i]`` is the rank of the task's answer i (0 = best, equal ranks = tie): JSON integers only
(``0.0``, ``true`` and ``"0"`` are refused). The key makes a retried post harmless: the first one is
stored (201), the same post again answers 200 with ``duplicate: true``; the same key with other
ranks, flags or better answer is a 409 that says so. A task outside the labeler's queue (skipped by
them, or with all the rankings it needs) is a 409 too. Answers: 201, 200, or a 4xx with a message.
"""

from __future__ import annotations

import random
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, StrictInt

from rlhfkit.feedback.store import FLAG_KINDS, TaskView
from rlhfkit.web.deps import DB_ID_MAX, check_csrf, require_user
from rlhfkit.web.templating import render

router = APIRouter()


def display_order(user_id: int, task: TaskView) -> list[int]:
    """The answers' order on this labeler's screen: a shuffle seeded by (user, task)."""
    order = list(range(len(task.responses)))
    random.Random(f"{user_id}:{task.id}").shuffle(order)
    return order


def _task_json(user_id: int, task: TaskView) -> dict:
    return {
        "id": task.id,
        "messages": task.messages,
        "answers": [{"index": i, "text": task.responses[i]} for i in display_order(user_id, task)],
    }


@router.get("/label", response_class=HTMLResponse)
def label_page(request: Request, user=Depends(require_user)):
    store = request.app.state.store
    task = store.next_task(user.id)
    answers = [] if task is None else [(i, task.responses[i]) for i in display_order(user.id, task)]
    return render(
        request,
        "label.html",
        user=user,
        task=task,
        answers=answers,
        flags=FLAG_KINDS,
        progress=store.progress(user.id),
        key=secrets.token_urlsafe(16),
    )


@router.get("/api/tasks/next")
def next_task(request: Request, user=Depends(require_user)):
    store = request.app.state.store
    task = store.next_task(user.id)
    return {"task": None if task is None else _task_json(user.id, task), "progress": store.progress(user.id)}


TaskId = Annotated[int, Path(ge=1, le=DB_ID_MAX, description="a task id")]
Rank = Annotated[StrictInt, Field(ge=0, le=8)]  # K <= 9 answers: ranks and answer indices are 0..8


class FlagIn(BaseModel):
    answer: Rank = Field(description="index of the flagged answer in the task")
    kind: str = Field(max_length=16, description="harmful | untruthful | off-topic")


class RankingIn(BaseModel):
    ranks: list[Rank] = Field(min_length=2, max_length=9)
    flags: list[FlagIn] = Field(default_factory=list, max_length=27)
    better_answer: str = Field("", max_length=20000)
    idempotency_key: str = Field(min_length=8, max_length=80)
    seconds: float | None = Field(
        None, ge=0, le=7 * 24 * 3600, allow_inf_nan=False, description="time spent on the task"
    )


@router.post("/api/tasks/{task_id}/ranking", dependencies=[Depends(check_csrf)])
def submit_ranking(request: Request, task_id: TaskId, body: RankingIn, user=Depends(require_user)):
    store = request.app.state.store
    done = store.add_ranking(
        user.id,
        task_id,
        body.ranks,
        body.idempotency_key,
        flags=[(f.answer, f.kind) for f in body.flags],
        better_answer=body.better_answer,
        seconds=body.seconds,
    )
    return JSONResponse(
        {"ranking_id": done.ranking_id, "duplicate": done.duplicate, "progress": store.progress(user.id)},
        status_code=200 if done.duplicate else 201,
    )


@router.post("/api/tasks/{task_id}/skip", dependencies=[Depends(check_csrf)])
def skip_task(request: Request, task_id: TaskId, user=Depends(require_user)):
    store = request.app.state.store
    store.skip(user.id, task_id)
    return {"skipped": task_id, "progress": store.progress(user.id)}
