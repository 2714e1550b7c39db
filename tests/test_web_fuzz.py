"""Fuzzing the JSON APIs with the rule "no 500, ever".

Every operation of the app's own OpenAPI schema (``app.openapi()``) under ``/api``, ``/v1`` and
``/arena/{id}`` gets requests that fit the schema and requests that break it (schemathesis' positive
and negative data), requests that a route accepts with one value swapped for one at the edge of its
type (ids and seeds past 64 bits, NaN, a lone surrogate, a 5,000-character string, ...) or of
another type, and bodies of bytes that are not UTF-8. Every one is sent signed
in as an admin, with the CSRF token and an API key, so each reaches its route's own checks. The
rules: no status >= 500; a 200 event stream ends with ``data: [DONE]`` (a stream broken in the
middle is the streaming form of a 500). All the failures are collected and reported together (the
request that gave each one), not just the first.

Hypothesis runs derandomized: CI sends the same ~650 requests every time. More, locally:
``RLHFKIT_FUZZ_EXAMPLES=5000 RLHFKIT_FUZZ_SEED=1 pytest tests/test_web_fuzz.py``.
No model is loaded: the pool is a stub that answers instantly (n samples, log-probs and all) and
checks its input as the real pool's edges do.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from web_support import csrf_of, sign_in

from rlhfkit.config import ServeConfig
from rlhfkit.feedback.store import Store, TaskIn
from rlhfkit.rollout.sampling import SamplingParams
from rlhfkit.web.app import create_app
from rlhfkit.web.models import Delta, Reply, TokenLogprob

EXAMPLES = int(os.environ.get("RLHFKIT_FUZZ_EXAMPLES", "650"))
FUZZED = re.compile(r"^/(api|v1)/|^/arena/\{")  # the JSON APIs, and the arena's id routes

# values at the edges of each JSON type: what a "hostile" request puts in place of one value
EDGES = {
    "integer": [2**63, 2**64, 2**70, -(2**63) - 1, -1, 0],
    "number": [math.nan, math.inf, -math.inf, 1e308, -0.0],
    "string": ["\ud800", "hi \udfff there", "", "x" * 5000, "\x00", "١٢"],
    "boolean": [True, False],
    "array": [[], [2**64], ["\ud800"], [0.0, 1.0], [False, True], [None]],
    "object": [{}, {"\ud800": 1}, {"": None}],
    "null": [None],
}
ANY_EDGE = [v for values in EDGES.values() for v in values]

HI = [{"role": "user", "content": "hi"}]
# a request each route accepts, every optional field set: "hostile" requests change one value of it
VALID = {
    ("POST", "/v1/chat/completions"): (
        {},
        {
            "model": "sft",
            "messages": HI,
            "max_tokens": 2,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": ["x"],
            "seed": 1,
            "logprobs": True,
            "top_logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("POST", "/api/chat"): ({}, {"model": "sft", "messages": HI, "max_tokens": 2, "seed": 1, "stream": True}),
    ("POST", "/v1/completions"): (
        {},
        {
            "model": "sft",
            "prompt": ["hi", "there"],
            "max_tokens": 2,
            "n": 2,
            "seed": 1,
            "logprobs": 1,
            "stop": "x",
            "temperature": 1.5,
        },
    ),
    ("GET", "/v1/models/{model_id}"): ({"model_id": "sft"}, None),
    ("POST", "/api/tasks/{task_id}/ranking"): (
        {"task_id": 1},
        {
            "ranks": [0, 1, 1],
            "idempotency_key": "fuzz-key-1",
            "flags": [{"answer": 1, "kind": "harmful"}],
            "better_answer": "a better one",
            "seconds": 3.5,
        },
    ),
    ("POST", "/api/tasks/{task_id}/skip"): ({"task_id": 2}, None),
    ("GET", "/arena/{battle_id}"): ({"battle_id": 1}, None),
    ("POST", "/arena/{battle_id}/vote"): ({"battle_id": 1}, {"outcome": "tie"}),
}


def json_type(value) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), "object")


def _leaves(value) -> list:
    """The leaves of a JSON value, depth first (an empty list or object is a leaf)."""
    if isinstance(value, dict) and value:
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list) and value:
        return [x for v in value for x in _leaves(v)]
    return [value]


def _swap(value, index: int, new):
    """``value`` with its ``index``-th leaf (the order of _leaves) replaced by ``new``."""
    count = -1

    def walk(v):
        nonlocal count
        if isinstance(v, dict) and v:
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list) and v:
            return [walk(x) for x in v]
        count += 1
        return new if count == index else v

    return walk(value)


@st.composite
def requests(draw, operations):
    """(method, schema path, path parameters, query, body, media type, kind). Kinds:
    fits / breaks: schemathesis' positive / negative data for the operation;
    hostile: the operation's VALID request (or a fitting one) with one path parameter or body leaf
    replaced by an edge value of its type (three times in four) or of any type;
    not-utf8: a body of bytes that are not UTF-8."""
    op = draw(st.sampled_from(operations))
    kind = draw(st.sampled_from(["fits", "breaks", "hostile", "hostile", "hostile", "not-utf8"]))
    if kind == "hostile" and (op.method.upper(), op.path) in VALID:
        params, body = VALID[op.method.upper(), op.path]
        params, query = dict(params), {}
    else:
        mode = GenerationMode.NEGATIVE if kind == "breaks" else GenerationMode.POSITIVE
        case = draw(op.as_strategy(generation_mode=mode))
        params, query, body = dict(case.path_parameters or {}), dict(case.query or {}), case.body
        body = None if type(body).__name__ == "NotSet" else body
    if kind == "hostile":
        leaves = _leaves(body) if body is not None else []
        i = draw(st.integers(0, len(params) + len(leaves) - 1)) if params or leaves else 0
        old = list(params.values())[i] if i < len(params) else leaves[i - len(params)] if leaves else None
        new = draw(st.sampled_from(EDGES[json_type(old)] if draw(st.integers(0, 3)) else ANY_EDGE))
        if i < len(params):
            params[list(params)[i]] = new
        elif leaves:
            body = _swap(body, i - len(params), new)
    return op.method.upper(), op.path, params, query, body, op.body[0].media_type if op.body else None, kind


class StubPool:
    """The ModelPool interface, instant: each sample's text is "a reply", each token's log-prob -1.
    It checks what the real pool's edges check (the sampling settings, as SamplingParams and the
    seeded generator take them; the text, as the tokenizer takes it), so bad input that would break
    the real pool breaks this one too."""

    versions = {"sft": "/nowhere/0", "ppo1": "/nowhere/1"}

    def names(self) -> list[str]:
        return list(self.versions)

    def stream(self, name, messages, max_new_tokens=16, n=1, logprobs=None, **kw):
        return self._samples([m["content"] for m in messages], 1, max_new_tokens, n, logprobs, kw)

    def stream_text(self, name, prompts, max_new_tokens=16, n=1, logprobs=None, **kw):
        return self._samples(prompts, len(prompts), max_new_tokens, n, logprobs, kw)

    def _samples(self, texts: list[str], prompts: int, max_new_tokens: int, n: int, logprobs: int | None, kw: dict):
        for t in texts:
            t.encode("utf-8")  # what the tokenizer needs
        params = SamplingParams(max_new_tokens=max_new_tokens, logprobs=logprobs or 0, **kw)
        if params.seed is not None:
            torch.Generator().manual_seed(params.seed)
        tokens = ["a", " reply"][:max_new_tokens]
        lps = None if logprobs is None else [TokenLogprob(t, -1.0, [(t, -1.0)] * logprobs) for t in tokens]
        for i in range(prompts * n):
            yield Delta("".join(tokens), i, lps)
            yield Reply("".join(tokens), "length" if max_new_tokens <= 2 else "stop", 3, len(tokens), i, lps)

    def reply(self, name, messages, **kw) -> Reply:
        return Reply("a reply", "stop", 3, 2)

    def sample(self, name, prompts, k, max_new_tokens, temperature=1.0, seed=0):
        return [[(f"answer {j}", True) for j in range(k)] for _ in prompts]


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    run = Path(tmp_path_factory.mktemp("fuzz")) / "run"
    store = Store.for_run(run)
    app = create_app(
        ServeConfig(run=str(run), rate_limit=0, max_body_kb=64, max_new_tokens=8), store=store, pool=StubPool()
    )
    store.create_user("root", role="admin", password="password123")
    key = store.new_api_key("root")
    store.add_tasks(
        "fuzz",
        [
            TaskIn([{"role": "user", "content": f"prompt {i}"}], [f"answer {j}" for j in range(3)], external_id=str(i))
            for i in range(6)
        ],
        labels_per_task=3,
    )
    client = TestClient(app, raise_server_exceptions=False)
    sign_in(client, "root")
    client.headers.update({"X-CSRF-Token": csrf_of(client), "Authorization": f"Bearer {key}"})
    r = client.post(
        "/arena", data={"prompt": "a battle to vote on", "csrf_token": csrf_of(client)}, follow_redirects=False
    )
    assert r.status_code in (200, 303), r.text
    yield app, client
    store.close()


def _url(path: str, params: dict) -> str:
    def one(m):
        v = params.get(m.group(1), "x")
        v = v if isinstance(v, bytes) else (v if isinstance(v, str) else json.dumps(v)).encode("utf-8", "surrogatepass")
        return quote(v, safe="")

    return re.sub(r"\{(\w+)(?::\w+)?\}", one, path)


def _content(body, media_type: str | None, kind: str) -> tuple[bytes | None, str | None]:
    if kind == "not-utf8":
        return b'{"model": "sft", "x": "\xff\xfe\xed\xa0\x80"}', "application/json"
    if body is None:
        return None, None
    if isinstance(body, (bytes, bytearray)):  # negative mode: a body that is not JSON at all
        return bytes(body), media_type or "application/json"
    if media_type and "form" in media_type and isinstance(body, dict):
        fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
        return urlencode(fields, encoding="utf-8", errors="surrogatepass").encode(), media_type
    return json.dumps(body).encode("utf-8", "surrogatepass"), "application/json"  # NaN as the literal NaN


def test_no_500_ever(fuzz_app):
    app, client = fuzz_app
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if FUZZED.search(op.path)]
    assert {"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/tasks/{task_id}/ranking"} <= {
        op.path for op in operations
    }
    sent: Counter = Counter()
    statuses: Counter = Counter()
    failures: dict[tuple, str] = {}  # (method, path, status) -> the first request that gave it

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize="RLHFKIT_FUZZ_SEED" not in os.environ,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(int(os.environ.get("RLHFKIT_FUZZ_SEED", "0")))
    @given(requests(operations))
    def send(req):
        method, path, params, query, body, media_type, kind = req
        content, ctype = _content(body, media_type, kind)
        headers = {"Content-Type": ctype} if ctype else {}
        q = {k: v if isinstance(v, str) else json.dumps(v) for k, v in query.items()}
        r = client.request(method, _url(path, params), params=q or None, content=content, headers=headers)
        sent[(method, path)] += 1
        statuses[r.status_code] += 1
        bad = r.status_code >= 500
        if (
            r.status_code == 200
            and r.headers.get("content-type", "").startswith("text/event-stream")
            and not r.text.endswith("data: [DONE]\n\n")
        ):
            bad = True
        if bad:
            shown = (content or b"")[:300].decode("utf-8", "backslashreplace")
            failures.setdefault(
                (method, path, r.status_code),
                f"{method} {_url(path, params)} ({kind}) body={shown} -> {r.status_code} {r.text[:200]}",
            )

    start = time.monotonic()
    send()
    took = time.monotonic() - start
    total = sum(sent.values())
    print(f"\nfuzz: {total} requests in {took:.1f} s; statuses {dict(sorted(statuses.items()))}")
    for (method, path), k in sorted(sent.items()):
        print(f"  {k:4d}  {method} {path}")
    assert not failures, "requests that gave a 500 (or a broken stream):\n" + "\n".join(failures.values())
    assert total >= 500 and sum(k for (_, p), k in sent.items() if p.startswith(("/api/", "/v1/"))) >= 500
    assert min(sent[(op.method.upper(), op.path)] for op in operations) >= 10  # every operation was fuzzed
