"""The arena: two anonymous model versions answer the same prompt side by side; the person votes
A, B, tie or both bad; the names are revealed after the vote. The leaderboard rates every version
from all votes with online Elo and a Bradley–Terry fit with bootstrap 95 % intervals
(``rlhfkit.algos.ratings``). As in Chatbot Arena, "both bad" counts as a tie in the ratings.
"""

from __future__ import annotations

import random
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from rlhfkit.algos.ratings import bradley_terry_bootstrap, elo_ratings
from rlhfkit.web.deps import DB_ID_MAX, check_csrf, require_user
from rlhfkit.web.templating import render

router = APIRouter()
BattleId = Annotated[int, Path(ge=1, le=DB_ID_MAX, description="a battle id")]
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


def leaderboard(votes: list[tuple[str, str, str]], n_boot: int = 200) -> list[dict]:
    """Rows best first: Elo (votes in order), Bradley–Terry with a 95 % bootstrap interval, counts."""
    if not votes:
        return []
    games = [(a, b, SCORE[o]) for a, b, o in votes]
    elo = elo_ratings(games)
    bt = bradley_terry_bootstrap(games, n_boot=n_boot, seed=0)
    counts = {m: {"votes": 0, "wins": 0, "ties": 0, "losses": 0, "both_bad": 0} for m in elo}
    for a, b, o in votes:
        for m, won in ((a, o == "a"), (b, o == "b")):
            c = counts[m]
            c["votes"] += 1
            if o == "both_bad":
                c["both_bad"] += 1
            elif o == "tie":
                c["ties"] += 1
            elif won:
                c["wins"] += 1
            else:
                c["losses"] += 1
    rows = [
        {"model": m, "elo": elo[m], "bt": bt[m].rating, "ci95": [bt[m].lower, bt[m].upper], **counts[m]} for m in elo
    ]
    return sorted(rows, key=lambda r: -r["bt"])


@router.get("/arena", response_class=HTMLResponse)
def arena_page(request: Request, user=Depends(require_user)):
    return render(request, "arena.html", user=user, battle=None, enough=len(request.app.state.pool.names()) >= 2)


@router.post("/arena", dependencies=[Depends(check_csrf)])
def new_battle(request: Request, prompt: str = Form(..., min_length=1, max_length=4000), user=Depends(require_user)):
    app = request.app
    names = app.state.pool.names()
    if len(names) < 2:
        raise HTTPException(409, "the arena needs at least two model versions (serve a run with more, or add --model)")
    if not prompt.strip():
        raise HTTPException(400, "write a prompt first")
    app.state.limiter.check(f"user:{user.id}")
    a, b = random.sample(names, 2)
    messages = [{"role": "user", "content": prompt}]
    kw = {"max_new_tokens": app.state.cfg.max_new_tokens, "temperature": 0.7}
    answer_a = app.state.pool.reply(a, messages, **kw).text
    answer_b = app.state.pool.reply(b, messages, **kw).text
    battle_id = app.state.store.add_battle(user.id, prompt, a, b, answer_a, answer_b)
    return RedirectResponse(f"/arena/{battle_id}", 303)


@router.get("/arena/{battle_id}", response_class=HTMLResponse)
def battle_page(request: Request, battle_id: BattleId, user=Depends(require_user)):
    b = request.app.state.store.battle(battle_id)
    if b is None or b.user_id != user.id:
        raise HTTPException(404, f"no battle {battle_id}")
    return render(request, "arena.html", user=user, battle=b, enough=True)


@router.post("/arena/{battle_id}/vote", dependencies=[Depends(check_csrf)])
def vote(request: Request, battle_id: BattleId, outcome: str = Form(...), user=Depends(require_user)):
    request.app.state.store.vote(user.id, battle_id, outcome)
    return RedirectResponse(f"/arena/{battle_id}", 303)


@router.get("/leaderboard", response_class=HTMLResponse)
def leaderboard_page(request: Request, user=Depends(require_user)):
    votes = request.app.state.store.votes()
    return render(request, "leaderboard.html", user=user, rows=leaderboard(votes), total=len(votes))


@router.get("/api/leaderboard")
def leaderboard_json(request: Request, user=Depends(require_user)):
    votes = request.app.state.store.votes()
    return {"votes": len(votes), "rows": leaderboard(votes)}
