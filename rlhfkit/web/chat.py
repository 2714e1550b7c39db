"""Chat with any model version, and the OpenAI-compatible API.

    GET  /v1/models                 {"object": "list", "data": [{"id": "sft", "object": "model", ...}]}
    POST /v1/chat/completions       OpenAI's request and response shapes; "stream": true answers with
                                    server-sent events: chat.completion.chunk objects, then [DONE]

The API takes a Bearer API key; the chat page (/chat, static/chat.js) posts the same request body
to /api/chat with its session and CSRF token and reads the same event stream. Both go through the
rate limiter. Only ``n = 1`` is served.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rlhfkit.web.models import Reply
from rlhfkit.web.security import api_user, check_csrf, require_user

router = APIRouter()


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|user|assistant|developer)$")
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields (user, logprobs, ...) are accepted and ignored
    model: str = Field(min_length=1, max_length=120)
    messages: list[MessageIn] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only n = 1 is served")


def _messages(body: ChatRequest) -> list[dict]:
    out = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if out[-1]["role"] == "assistant":
        raise HTTPException(400, "messages: the last message must be from the user (or system), not the assistant")
    return out


def _complete(request: Request, body: ChatRequest, user):
    app = request.app
    pool, cfg = app.state.pool, app.state.cfg
    if body.model not in pool.versions:
        raise HTTPException(404, f"model {body.model!r} does not exist; served: {', '.join(pool.names())}")
    app.state.limiter.check(f"user:{user.id}")
    cap = cfg.max_new_tokens
    wanted = body.max_completion_tokens or body.max_tokens or cap
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    gen = pool.stream(body.model, _messages(body), max_new_tokens=min(wanted, cap), temperature=body.temperature,
                      top_p=body.top_p, stop=[s for s in stop if s], seed=body.seed)
    first = next(gen)  # errors (bad prompt) surface here, before any byte is sent
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    items = itertools.chain([first], gen)
    if not body.stream:
        reply = next(i for i in items if isinstance(i, Reply))
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

    def chunk(delta: dict, finish: str | None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def events():
        yield chunk({"role": "assistant", "content": ""}, None)
        for item in items:
            if isinstance(item, Reply):
                yield chunk({}, item.finish_reason)
            else:
                yield chunk({"content": item}, None)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/models")
def list_models(request: Request, user=Depends(api_user)):
    created = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "rlhfkit"}
                                       for n in request.app.state.pool.names()]}


@router.post("/v1/chat/completions")
def chat_completions(request: Request, body: ChatRequest, user=Depends(api_user)):
    return _complete(request, body, user)


@router.post("/api/chat", dependencies=[Depends(check_csrf)])
def chat_api(request: Request, body: ChatRequest, user=Depends(require_user)):
    return _complete(request, body, user)


@router.get("/chat", response_class=HTMLResponse)
def chat_page(request: Request, user=Depends(require_user)):
    from rlhfkit.web.app import render

    return render(request, "chat.html", user=user, models=request.app.state.pool.names())
