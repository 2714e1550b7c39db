"""The labeling queue: one task at a time (a prompt and K answers), ranked best to worst.

Answers are shown in an order shuffled per labeler and task (stable across reloads) and without
model names. The page (static/label.js) orders them by drag and drop or by keyboard, marks ties,
flags answers, takes an optional better answer (stored as a demonstration) and posts JSON here:

    POST /api/tasks/{id}/ranking  {"ranks": [...], "flags": [{"answer": 2, "kind": "harmful"}],
                                   "better_answer": "", "idempotency_key": "…"}

``ranks[i]`` is the rank of the task's answer i (0 = best, equal ranks = tie). The key makes a
retried post harmless: the first one is stored, repeats answer 200 with ``duplicate: true``.
"""

from __future__ import annotations

import random
import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from rlhfkit.feedback.store import FLAG_KINDS, TaskView
from rlhfkit.web.security import check_csrf, require_user

router = APIRouter()


def display_order(user_id: int, task: TaskView) -> list[int]:
    """The answers' order on this labeler's screen: a shuffle seeded by (user, task)."""
    order = list(range(len(task.responses)))
    random.Random(f"{user_id}:{task.id}").shuffle(order)
    return order


def _task_json(user_id: int, task: TaskView) -> dict:
    return {"id": task.id, "messages": task.messages,
            "answers": [{"index": i, "text": task.responses[i]} for i in display_order(user_id, task)]}


@router.get("/label", response_class=HTMLResponse)
def label_page(request: Request, user=Depends(require_user)):
    from rlhfkit.web.app import render

    store = request.app.state.store
    task = store.next_task(user.id)
    answers = [] if task is None else [(i, task.responses[i]) for i in display_order(user.id, task)]
    return render(request, "label.html", user=user, task=task, answers=answers, flags=FLAG_KINDS,
                  progress=store.progress(user.id), key=secrets.token_urlsafe(16))


@router.get("/api/tasks/next")
def next_task(request: Request, user=Depends(require_user)):
    store = request.app.state.store
    task = store.next_task(user.id)
    return {"task": None if task is None else _task_json(user.id, task), "progress": store.progress(user.id)}


class FlagIn(BaseModel):
    answer: int = Field(ge=0, description="index of the flagged answer in the task")
    kind: str = Field(description="harmful | untruthful | off-topic")


class RankingIn(BaseModel):
    ranks: list[int] = Field(min_length=2, max_length=9)
    flags: list[FlagIn] = Field(default_factory=list, max_length=27)
    better_answer: str = Field("", max_length=20000)
    idempotency_key: str = Field(min_length=8, max_length=80)
    seconds: float | None = Field(None, ge=0)


@router.post("/api/tasks/{task_id}/ranking", dependencies=[Depends(check_csrf)])
def submit_ranking(request: Request, task_id: int, body: RankingIn, user=Depends(require_user)):
    store = request.app.state.store
    done = store.add_ranking(user.id, task_id, body.ranks, body.idempotency_key,
                             flags=[(f.answer, f.kind) for f in body.flags],
                             better_answer=body.better_answer, seconds=body.seconds)
    return JSONResponse({"ranking_id": done.ranking_id, "duplicate": done.duplicate,
                         "progress": store.progress(user.id)}, status_code=200 if done.duplicate else 201)


@router.post("/api/tasks/{task_id}/skip", dependencies=[Depends(check_csrf)])
def skip_task(request: Request, task_id: int, user=Depends(require_user)):
    store = request.app.state.store
    store.skip(user.id, task_id)
    return {"skipped": task_id, "progress": store.progress(user.id)}
