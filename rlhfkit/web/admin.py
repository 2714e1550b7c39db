"""The admin dashboard (admin role only): tasks done per labeler, inter-annotator agreement on
tasks ranked twice or more, labeling batches made from the served model versions, exports, users,
and the audit log of failed sign-ins (the latest 50: when, the name typed, the client address, why).
"""

from __future__ import annotations

import random
from pathlib import Path

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from rlhfkit.data.jsonl import dumps_line
from rlhfkit.feedback.agreement import agreement_summary
from rlhfkit.feedback.human import export, publish
from rlhfkit.tasks import load_task
from rlhfkit.web.deps import check_csrf, require_admin
from rlhfkit.web.templating import render

router = APIRouter()


def stats(store) -> dict:
    return {
        "labelers": store.per_labeler(),
        "agreement": agreement_summary(store.ranks_by_task()),
        "batches": store.batches(),
        "failed_sign_ins": store.failed_sign_ins(50),
    }


def _page(request: Request, user, status: int = 200, **extra) -> HTMLResponse:
    app = request.app
    base = app.state.cfg.public_url.rstrip("/") or str(request.base_url).rstrip("/")
    return render(
        request,
        "admin.html",
        status=status,
        user=user,
        base=base,
        models=app.state.pool.names(),
        users=app.state.store.users(),
        **stats(app.state.store),
        **extra,
    )


@router.get("/admin", response_class=HTMLResponse)
def dashboard(request: Request, user=Depends(require_admin)):
    return _page(request, user)


@router.get("/api/admin/stats")
def stats_json(request: Request, user=Depends(require_admin)):
    s = stats(request.app.state.store)
    a = s["agreement"]
    s["agreement"] = {k: (None if isinstance(v, float) and v != v else v) for k, v in a.items()}  # nan -> null
    return s


@router.post("/admin/users", dependencies=[Depends(check_csrf)])
def add_user(
    request: Request,
    name: str = Form(..., min_length=1, max_length=80),
    role: str = Form("labeler"),
    user=Depends(require_admin),
):
    _, invite = request.app.state.store.create_user(name, role=role)
    return _page(request, user, status=201, invite=(name, invite))


@router.post("/admin/batches", dependencies=[Depends(check_csrf)])
def create_batch(
    request: Request,
    model: str = Form(...),
    batch: str = Form("", max_length=120),
    prompts: str = Form("", max_length=200_000),
    n_prompts: int = Form(8, ge=1, le=500),
    k: int = Form(4, ge=2, le=9),
    labels_per_task: int = Form(1, ge=1, le=5),
    max_new_tokens: int = Form(64, ge=1, le=1024),
    user=Depends(require_admin),
):
    """K answers per prompt from one served version: the prompts typed in (one a line), else a
    seeded sample of the built-in task's train prompts."""
    app = request.app
    if model not in app.state.pool.versions:
        raise HTTPException(404, f"no model version {model!r}")
    typed = [p.strip() for p in prompts.splitlines() if p.strip()]
    if typed:
        rows = [{"id": f"typed{i}", "prompt": p} for i, p in enumerate(typed)]
    else:
        train = load_task("train")
        picked = random.Random(len(app.state.store.batches())).sample(train, min(n_prompts, len(train)))
        rows = [{"id": p.meta.get("id", i), "prompt": p.text} for i, p in enumerate(picked)]
    answers = app.state.pool.sample(
        model,
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        k,
        min(max_new_tokens, app.state.cfg.max_new_tokens),
    )
    for r, ans in zip(rows, answers):
        r["responses"], r["finished"] = [a for a, _ in ans], [f for _, f in ans]
    name = batch.strip() or f"{model}-{len(app.state.store.batches()) + 1}"
    publish(app.state.store, name, rows, model=model, labels_per_task=labels_per_task)
    return RedirectResponse("/admin", 303)


@router.post("/admin/export", dependencies=[Depends(check_csrf)])
def export_all(request: Request, user=Depends(require_admin)):
    out = Path(request.app.state.cfg.run) / "exports"
    return _page(request, user, exported=export(request.app.state.store, out))


@router.get("/admin/export/{kind}.jsonl")
def download(request: Request, kind: str, user=Depends(require_admin)):
    store = request.app.state.store
    if kind not in ("rankings", "demonstrations"):
        raise HTTPException(404, f"nothing to export as {kind!r}: rankings or demonstrations")
    rows = store.rankings() if kind == "rankings" else store.demonstrations()
    return Response(
        "".join(dumps_line(r) + "\n" for r in rows),
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{kind}.jsonl"'},
    )
