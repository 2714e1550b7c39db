"""Chat with any model version, and the OpenAI-compatible API.

    GET  /v1/models                 {"object": "list", "data": [{"id": "sft", "object": "model", ...}]}
    GET  /v1/models/{id}            one of them, or 404 (code "model_not_found")
    POST /v1/chat/completions       OpenAI's request and response shapes; "stream": true answers with
                                    server-sent events: chat.completion.chunk objects, then [DONE]
    POST /v1/completions            plain text prompts (no chat template), one or a list of them

The API takes a Bearer API key; the chat page (/chat, static/chat.js) posts the same request body
to /api/chat with its session and CSRF token and reads the same event stream. Both go through the
rate limiter.

What is served as OpenAI does: ``n`` samples (they share one prefill), ``logprobs`` and
``top_logprobs`` (log_softmax(logits / T) of the rollout engine, the same numbers PPO uses),
``seed``, ``stop``, ``stream_options.include_usage`` (a last chunk with ``usage`` and no choices),
and ``top_k`` as an extension. What our models cannot do is refused with a 400 that names the
parameter, never ignored: tools and function calls, ``response_format`` other than text, logit
bias, penalties, audio, and any argument we do not know. ``max_tokens`` above the server's
``--max-new-tokens`` is refused too (400, ``param: "max_tokens"``), as OpenAI refuses more than a
model can make. Every error of these routes is OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rlhfkit.errors import UserError
from rlhfkit.rollout.sampling import SEED_MAX, SEED_MIN
from rlhfkit.web.deps import api_user, check_csrf, require_user
from rlhfkit.web.error_pages import status_for
from rlhfkit.web.models import Delta, Reply, TokenLogprob
from rlhfkit.web.templating import render

MAX_CHOICES = 16  # samples per request (n × prompts): one decode batch of the model pool's engine
MAX_TOP_LOGPROBS = 20  # OpenAI's limits: 20 alternatives in chat, 5 in the legacy completions
MIN_LOGPROB = -9999.0  # OpenAI's floor; JSON has no -inf


# ---------------------------------------------------------------- errors in OpenAI's shape


class APIError(HTTPException):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found", 429: "rate_limit_exceeded"}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code or ERROR_CODES.get(status),
        }
    }
    return JSONResponse(body, status, headers=headers)


def _param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; pydantic's union tags
    (``"list[str]"``, ``"function-after[...]"``) end the path."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int) and out:
            out += f"[{part}]"
        elif (
            isinstance(part, str)
            and part.isidentifier()
            and part not in ("str", "int", "float", "bool", "dict", "list", "none")
        ):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 with the first errors (at most 5, each once), ``param`` and ``code`` from the first."""
    errors = exc.errors()
    parts: list[str] = []
    for e in errors:
        where = (e.get("ctx") or {}).get("param") or _param(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid")
        line = msg if where and msg.startswith(where) else f"{where or 'body'}: {msg}"
        if line not in parts and len(parts) < 5:
            parts.append(line)
    first = errors[0] if errors else {}
    param = (first.get("ctx") or {}).get("param") or _param(tuple(first.get("loc", ())))
    code = first.get("type")
    code = code if code in ("unsupported_parameter", "unknown_parameter") else "invalid_value"
    return error_response(400, "; ".join(parts) or "invalid request", param, code)


class OpenAIRoute(APIRoute):
    """Answers the errors of its routes (bad body, auth, unknown model, rate limit, a UserError of
    the engine such as a prompt longer than the model) in OpenAI's shape, status 400 for a bad body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except APIError as exc:
                return error_response(exc.status_code, exc.detail, exc.param, exc.code, exc.headers)
            except HTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
            except UserError as exc:  # the status by class (error_pages.status_for): 400 unless NotFound/Conflict
                status = status_for(exc)
                return error_response(status, str(exc), code="invalid_value" if status == 400 else None)

        return route


# ---------------------------------------------------------------- requests


def _check_unicode(value: Any, where: str = "") -> None:
    """Every string and key of a JSON body must be encodable text: a lone surrogate (``"\\ud800"``,
    legal in JSON) would break the tokenizer and the UTF-8 response (a 500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param}: not valid Unicode (a lone surrogate {char} at {pos}); send UTF-8 text",
                {"param": where or "body", "char": f"U+{ord(value[e.start]):04X}", "pos": e.start},
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where or "body")
            _check_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{where}[{i}]")


# parameter -> (its values that change nothing, why other values are refused)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "tools": ((None, []), "tool calling is not supported by this server's models"),
    "tool_choice": ((None, "none"), "tool calling is not supported by this server's models"),
    "functions": ((None, []), "function calling is not supported by this server's models"),
    "function_call": ((None, "none"), "function calling is not supported by this server's models"),
    "response_format": ((None, {"type": "text"}), "structured output is not supported: only {'type': 'text'}"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported (only 0)"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported (only 0)"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "echo": ((None, False), "echo is not supported"),
}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # accepted: the answer is the same


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts: images and audio are not supported")
    text: str


class _Sampling(BaseModel):
    """The fields both endpoints share; numbers are strict (``true`` is not 1, ``"1"`` is not 1)."""

    model_config = ConfigDict(extra="allow")  # unknown arguments are refused in _refuse_unknown, by name
    model: str = Field(min_length=1, max_length=120)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=-1, description="an extension (as vLLM's): 0 or -1 = off")
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")  # a list after validation
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v if v is not None else []
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops) or len(stops) > 4:
            raise PydanticCustomError("stop", "stop: a string or a list of up to 4 strings")
        return [x for x in stops if x]  # an empty stop string stops nothing

    @model_validator(mode="after")
    def _refuse_unknown(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name not in UNSUPPORTED:
                raise PydanticCustomError(
                    "unknown_parameter", "{param}: unrecognized request argument", {"param": name}
                )
            harmless, why = UNSUPPORTED[name]
            if value not in harmless:
                raise PydanticCustomError("unsupported_parameter", "{param}: {why}", {"param": name, "why": why})
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "needs_stream", "{param}: only allowed when stream is true", {"param": "stream_options"}
            )
        return self


class MessageIn(BaseModel):
    # what the openai client echoes back from an answer (refusal, annotations, ...) is accepted and not used
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = ""
    name: str | None = Field(None, max_length=64)
    tool_calls: list[Any] | None = None
    function_call: Any = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, v):
        if v:
            raise PydanticCustomError("unsupported_parameter", "tool and function calls are not supported")
        return None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[MessageIn] = Field(min_length=1, max_length=200)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs_asked(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("needs_logprobs", "{param}: needs logprobs: true", {"param": "top_logprobs"})
        if self.messages[-1].role == "assistant":
            raise PydanticCustomError(
                "last_message",
                "{param}: the last message must be from the user (or system), not the assistant",
                {"param": "messages"},
            )
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description=f"a text or a list of up to {MAX_CHOICES} texts (not token ids)")
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    best_of: StrictInt | None = Field(
        None, ge=1, description="candidates per prompt, of which the reward model's n best are returned (>= n)"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_type(cls, v):
        if not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise PydanticCustomError("prompt_type", "prompt: a text or a list of texts (token ids are not supported)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not 1 <= len(prompts) <= MAX_CHOICES:
            raise PydanticCustomError("prompts", "prompt: 1 to {most} prompts", {"most": MAX_CHOICES})
        if not all(prompts):
            raise PydanticCustomError("empty_prompt", "prompt: must not be empty")
        return prompts

    @model_validator(mode="after")
    def _choices(self):
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise PydanticCustomError("best_of", "{param}: must be >= n", {"param": "best_of"})
        if len(self.prompt) * max(self.n or 1, self.best_of or 1) > MAX_CHOICES:
            raise PydanticCustomError(
                "too_many",
                "{param}: at most {most} samples per request (n × prompts)",
                {"param": "n", "most": MAX_CHOICES},
            )
        return self


# ---------------------------------------------------------------- generation


def _max_new_tokens(request: Request, body: _Sampling, default: int | None = None) -> int:
    """The tokens asked for, or ``default`` (else the cap); over the server's cap is a 400 (never cut)."""
    cap = request.app.state.cfg.max_new_tokens
    asked = {"max_tokens": body.max_tokens, "max_completion_tokens": getattr(body, "max_completion_tokens", None)}
    for name, value in asked.items():
        if value is not None and value > cap:
            raise APIError(
                400,
                f"{name}={value} is over this server's cap of {cap} new tokens "
                f"(rlhfkit serve --max-new-tokens); ask for at most {cap}",
                name,
                "invalid_value",
            )
    return asked["max_completion_tokens"] or asked["max_tokens"] or min(default or cap, cap)


def _generate(
    request: Request, body: _Sampling, user, prompt: list[dict] | list[str], logprobs: int | None, max_new_tokens: int
) -> Iterator[Delta | Reply]:
    """Checks the model and the rate limit, then starts generating: errors (a prompt longer than the
    model) surface here, before any byte is sent. ``prompt``: a conversation, or plain texts
    (/v1/completions). Yields the pool's items."""
    app = request.app
    pool = app.state.pool
    if body.model not in pool.versions:
        raise APIError(
            404, f"model {body.model!r} does not exist; served: {', '.join(pool.names())}", "model", "model_not_found"
        )
    app.state.limiter.check(f"user:{user.id}")
    kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop or [],
        seed=body.seed,
        n=body.n or 1,
        top_k=max(body.top_k or 0, 0),
        logprobs=logprobs,
    )
    texts = isinstance(body, CompletionRequest)
    asked = getattr(body, "best_of", None)
    if asked is not None and asked > kw["n"]:
        cap = max(getattr(pool, "best_of", 1), kw["n"]) if getattr(pool, "reward_fn", None) else kw["n"]
        if asked > cap:
            raise APIError(
                400,
                f"best_of={asked} is over this server's cap of {cap} (rlhfkit serve --best-of N --reward-model RM)",
                "best_of",
                "invalid_value",
            )
        kw["best_of"] = asked
    gen = pool.stream_text(body.model, prompt, **kw) if texts else pool.stream(body.model, prompt, **kw)
    first = next(gen)
    return itertools.chain([first], gen)


def _items(items) -> Iterator[Delta | Reply]:
    """The pool's items; a plain string (a pool without indexes and log-probs) is sample 0's text."""
    for item in items:
        yield Delta(item) if isinstance(item, str) else item


def _finished(items) -> list[Reply]:
    return sorted((i for i in _items(items) if isinstance(i, Reply)), key=lambda r: r.index)


def _usage(replies: list[Reply], n: int) -> dict:
    prompt = sum(r.prompt_tokens for r in replies if r.index % n == 0)  # n samples share a prompt
    done = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", "replace"))


def _logprob(x: float) -> float:
    return max(x, MIN_LOGPROB)


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": _logprob(e.logprob),
                "bytes": _bytes(e.token),
                "top_logprobs": [{"token": t, "logprob": _logprob(lp), "bytes": _bytes(t)} for t, lp in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy shape: parallel lists; ``text_offset`` counts characters from ``offset``."""
    if entries is None:
        return None
    starts = list(itertools.accumulate((len(e.token) for e in entries), initial=offset))[:-1]
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [{t: _logprob(lp) for t, lp in e.top} for e in entries],
        "text_offset": starts,
    }


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(items, header: dict, choice, first_chunks: list[dict], usage: bool, n: int) -> StreamingResponse:
    """Server-sent events: ``first_chunks``, one chunk per Delta or Reply (``choice(item)`` makes its
    choice), the usage chunk when asked, then [DONE]."""

    def chunk(choices: list[dict], **extra) -> str:
        return _sse({**header, "choices": choices, **({"usage": None} if usage else {}), **extra})

    def events():
        for c in first_chunks:
            yield chunk([c])
        replies = []
        for item in _items(items):
            if isinstance(item, Reply):
                replies.append(item)
            yield chunk([choice(item)])
        if usage:
            yield chunk([], usage=_usage(replies, n))
        yield _sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _chat(request: Request, body: ChatRequest, user):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    items = _generate(request, body, user, messages, logprobs, _max_new_tokens(request, body))
    n = body.n or 1
    header = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
    }
    if not body.stream:
        replies = _finished(items)
        return {
            **header,
            "choices": [
                {
                    "index": r.index,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": _chat_logprobs(r.logprobs),
                }
                for r in replies
            ],
            "usage": _usage(replies, n),
        }

    def choice(item: Delta | Reply) -> dict:
        if isinstance(item, Reply):  # its text and log-probs came in Deltas already
            return {"index": item.index, "delta": {}, "finish_reason": item.finish_reason, "logprobs": None}
        return {
            "index": item.index,
            "delta": {"content": item.text},
            "finish_reason": None,
            "logprobs": _chat_logprobs(item.logprobs),
        }

    first = [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        for i in range(n)
    ]
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return _stream(items, {**header, "object": "chat.completion.chunk"}, choice, first, usage, n)


def _completion(request: Request, body: CompletionRequest, user):
    max_new_tokens = _max_new_tokens(request, body, default=16)  # OpenAI's default for /v1/completions
    items = _generate(request, body, user, body.prompt, body.logprobs, max_new_tokens)
    n = body.n or 1
    header = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    if not body.stream:
        replies = _finished(items)
        return {
            **header,
            "choices": [
                {
                    "index": r.index,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "logprobs": _completion_logprobs(r.logprobs),
                }
                for r in replies
            ],
            "usage": _usage(replies, n),
        }
    offsets: dict[int, int] = {}  # characters of each choice's log-prob tokens sent so far

    def choice(item: Delta | Reply) -> dict:
        if isinstance(item, Reply):
            return {"index": item.index, "text": "", "finish_reason": item.finish_reason, "logprobs": None}
        lps = _completion_logprobs(item.logprobs, offsets.get(item.index, 0))
        offsets[item.index] = offsets.get(item.index, 0) + sum(len(e.token) for e in item.logprobs or [])
        return {"index": item.index, "text": item.text, "finish_reason": None, "logprobs": lps}

    usage = bool(body.stream_options and body.stream_options.include_usage)
    return _stream(items, header, choice, [], usage, n)


# ---------------------------------------------------------------- routes

router = APIRouter()
api = APIRouter(route_class=OpenAIRoute)


def _model(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "rlhfkit"}


@api.get("/v1/models")
def list_models(request: Request, user=Depends(api_user)):
    created = int(time.time())
    return {"object": "list", "data": [_model(n, created) for n in request.app.state.pool.names()]}


@api.get("/v1/models/{model_id:path}")
def get_model(request: Request, model_id: str, user=Depends(api_user)):
    pool = request.app.state.pool
    if model_id not in pool.versions:
        raise APIError(
            404, f"model {model_id!r} does not exist; served: {', '.join(pool.names())}", "model", "model_not_found"
        )
    return _model(model_id, int(time.time()))


@api.post("/v1/chat/completions")
def chat_completions(request: Request, body: ChatRequest, user=Depends(api_user)):
    return _chat(request, body, user)


@api.post("/v1/completions")
def completions(request: Request, body: CompletionRequest, user=Depends(api_user)):
    return _completion(request, body, user)


@api.post("/api/chat", dependencies=[Depends(check_csrf)])
def chat_api(request: Request, body: ChatRequest, user=Depends(require_user)):
    return _chat(request, body, user)


router.include_router(api)


@router.get("/chat", response_class=HTMLResponse)
def chat_page(request: Request, user=Depends(require_user)):
    return render(request, "chat.html", user=user, models=request.app.state.pool.names())
