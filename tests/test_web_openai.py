"""The OpenAI-compatible API as real clients use it, in-process on the tiny model:
the official ``openai`` client talks to the app through Starlette's TestClient (an httpx.Client).

Each test guards one finding: usage in the last stream chunk when ``stream_options.include_usage``
is asked (``llm`` logged streamed calls with null token counts); ``GET /v1/models/{id}``; log-probs
and top log-probs that are the engine's numbers; ``n`` samples; tools, response_format and other
unsupported arguments refused with a 400 that names them (they were accepted and ignored);
``max_tokens`` over the cap refused (it was silently cut); ``/v1/completions``; a seed past the
sampler's range and a lone surrogate are 400s (they were 500s). Errors are OpenAI's shape.
The ``llm`` CLI against a real server: test_web_server.py.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from web_support import csrf_of, make_run, sign_in

from rlhfkit.config import ServeConfig
from rlhfkit.rollout import SamplingParams
from rlhfkit.web.app import create_app

CAP = 8  # the server's --max-new-tokens
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def app(tiny_path, tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("openai"), tiny_path)
    app = create_app(ServeConfig(run=str(run), max_new_tokens=CAP, precision="fp32", rate_limit=10_000))
    app.state.store.create_user("ann", password="password123")
    app.key = app.state.store.new_api_key("ann")
    return app


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=app.key, max_retries=0, http_client=TestClient(app))


def post(app, path: str, body: dict | str, **kw):
    c = TestClient(app)
    headers = {"Authorization": f"Bearer {app.key}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    return c.post(path, content=content.encode("utf-8", "surrogatepass"), headers=headers, **kw)


def openai_error(r, status: int) -> dict:
    """The body of an error: exactly OpenAI's shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"]
    return body["error"]


def engine_greedy(app, ids: list[int], new: int, logprobs: int = 0):
    engine, _, _ = app.state.pool._get("sft")
    return engine.generate([ids], SamplingParams(max_new_tokens=new, temperature=0, logprobs=logprobs))[0]


def chat_ids(app, messages) -> list[int]:
    _, tok, _ = app.state.pool._get("sft")
    return app.state.pool._encode(tok, messages)


# ---------------------------------------------------------------- usage in the stream


def test_stream_usage_in_the_last_chunk_when_asked(client):
    whole = client.chat.completions.create(model="sft", messages=HI, max_tokens=5, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="sft", messages=HI, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == whole.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    assert last.usage.completion_tokens == 5 and last.usage.prompt_tokens > 5
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    plain = list(client.chat.completions.create(model="sft", messages=HI, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # not asked: no usage chunk


def test_stream_options_need_stream(app):
    r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, "stream_options": {"include_usage": True}})
    assert openai_error(r, 400)["param"] == "stream_options"


# ---------------------------------------------------------------- GET /v1/models/{id}


def test_get_one_model(client, app):
    m = client.models.retrieve("ppo1")
    assert (m.id, m.object, m.owned_by) == ("ppo1", "model", "rlhfkit")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    err = openai_error(TestClient(app).get("/v1/models/gpt-9", headers={"Authorization": f"Bearer {app.key}"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"] and "sft" in err["message"]
    assert openai_error(TestClient(app).get("/v1/models/sft"), 401)["code"] == "invalid_api_key"


# ---------------------------------------------------------------- log-probs


def test_logprobs_and_top_logprobs_are_the_engines(client, app):
    out = client.chat.completions.create(
        model="sft", messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    ref = engine_greedy(app, chat_ids(app, HI), 6, logprobs=3)
    assert len(content) == 6 == out.usage.completion_tokens
    assert [e.logprob for e in content] == pytest.approx(ref.logprobs, abs=1e-5)
    _, tok, _ = app.state.pool._get("sft")
    assert [e.token for e in content] == [tok.decode([t]) for t in ref.token_ids]
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for e, top in zip(content, ref.top_logprobs):
        assert len(e.top_logprobs) == 3
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-5)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the likeliest
        assert bytes(e.bytes).decode() == e.token
    # streamed: the same numbers, spread over the chunks
    chunks = client.chat.completions.create(
        model="sft", messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model="sft", messages=HI, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, **bad})
        assert openai_error(r, 400)["param"] == "top_logprobs"


# ---------------------------------------------------------------- n samples


def test_n_samples_share_one_prefill(client, app, monkeypatch):
    engine, _, _ = app.state.pool._get("sft")
    prefills = []
    real = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda *a, **kw: prefills.append(1) or real(*a, **kw))
    out = client.chat.completions.create(model="sft", messages=HI, max_tokens=4, temperature=1.0, seed=7, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and len(prefills) == 1
    assert len({c.message.content for c in out.choices}) > 1  # real samples, not copies
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(chat_ids(app, HI))
    chunks = list(
        client.chat.completions.create(
            model="sft", messages=HI, max_tokens=4, temperature=1.0, seed=7, n=3, stream=True
        )
    )
    texts = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(3)
    }
    assert [texts[i] for i in range(3)] == [c.message.content for c in out.choices]  # same seed, same samples
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 3
    r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, "n": 17})
    assert openai_error(r, 400)["param"] == "n"


# ---------------------------------------------------------------- refused, never ignored


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [TOOL["function"]]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"logit_bias": {"42": 100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"mirostat": 2}, "mirostat"),  # not an OpenAI argument at all
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, HI[0]]},
            "messages[0].tool_calls",
        ),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ],
)
def test_unsupported_arguments_are_refused_by_name(app, extra, param):
    r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, "max_tokens": 2, **extra})
    err = openai_error(r, 400)
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_openai_client_sees_a_bad_request_for_tools(client):
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        client.chat.completions.create(model="sft", messages=HI, tools=[TOOL])
    with pytest.raises(openai.BadRequestError, match="structured output"):
        client.chat.completions.create(model="sft", messages=HI, response_format={"type": "json_object"})


def test_harmless_defaults_are_accepted(client):
    """What clients send with default values changes nothing, so it is no reason for a 400."""
    out = client.chat.completions.create(
        model="sft",
        messages=[
            *HI,
            {"role": "assistant", "content": "Hi!", "refusal": None, "tool_calls": []},
            {"role": "user", "content": [{"type": "text", "text": "Again."}]},
        ],
        max_tokens=2,
        temperature=0,
        response_format={"type": "text"},
        presence_penalty=0,
        frequency_penalty=0,
        tools=[],
        logit_bias={},
        user="ann",
        metadata={"run": "x"},
        store=False,
        parallel_tool_calls=False,
    )
    assert out.usage.completion_tokens == 2


# ---------------------------------------------------------------- max_tokens over the cap


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_cap_is_refused(app, field):
    r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, field: CAP + 1})
    err = openai_error(r, 400)
    assert err["param"] == field and f"cap of {CAP}" in err["message"] and "--max-new-tokens" in err["message"]
    r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, field: CAP, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= CAP
    r = post(app, "/v1/completions", {"model": "sft", "prompt": "Hi", "max_tokens": 2**70})
    assert openai_error(r, 400)["param"] == "max_tokens"


# ---------------------------------------------------------------- /v1/completions


def test_completions_plain_prompts(client, app):
    _, tok, _ = app.state.pool._get("sft")
    prompt = "Once upon a time"
    out = client.completions.create(model="sft", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    ref = engine_greedy(app, tok(prompt)["input_ids"], 5, logprobs=2)  # the text itself, no chat template
    c = out.choices[0]
    assert out.object == "text_completion" and c.text == ref.text and c.finish_reason == "length"
    assert c.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert [len(d) for d in c.logprobs.top_logprobs] == [2] * 5 and c.logprobs.text_offset[0] == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), 5)
    streamed = list(
        client.completions.create(
            model="sft", prompt=prompt, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(x.choices[0].text for x in streamed if x.choices) == c.text
    assert streamed[-1].usage.completion_tokens == 5 and streamed[-1].choices == []
    # a list of prompts, n each: choice i·n + j is sample j of prompt i
    many = client.completions.create(model="sft", prompt=[prompt, "Hello"], n=2, max_tokens=3, temperature=0)
    assert [x.index for x in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == engine_greedy(app, tok(prompt)["input_ids"], 3).text
    assert many.choices[2].text == engine_greedy(app, tok("Hello")["input_ids"], 3).text
    assert many.usage.prompt_tokens == len(tok(prompt)["input_ids"]) + len(tok("Hello")["input_ids"])
    default = client.completions.create(model="sft", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == min(16, CAP)  # OpenAI's default max_tokens, within the cap


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a"] * 17}, "prompt"),
        ({"prompt": ["a", "b", "c"], "n": 6}, "n"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": "a", "model": "gpt-9"}, "model"),
    ],
)
def test_completions_bad_requests(app, body, param):
    r = post(app, "/v1/completions", {"model": "sft", **body})
    assert openai_error(r, 404 if param == "model" else 400)["param"] == param


# ---------------------------------------------------------------- edge validation: no 500


def test_seed_within_the_samplers_range(app):
    for seed in (2**70, 2**64, -(2**63) - 1):
        r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, "max_tokens": 1, "seed": seed})
        assert openai_error(r, 400)["param"] == "seed"
    for seed in (2**64 - 1, -(2**63), 0):
        r = post(app, "/v1/chat/completions", {"model": "sft", "messages": HI, "max_tokens": 1, "seed": seed})
        assert r.status_code == 200, r.text
    r = post(app, "/v1/completions", {"model": "sft", "prompt": "a", "max_tokens": 1, "seed": 2**70})
    assert openai_error(r, 400)["param"] == "seed"


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "sft", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
        (
            '{"model": "sft", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages[0].content[0].text",
        ),
        ('{"model": "s\\ud83d", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        ('{"model": "sft", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop[0]"),
        ('{"model": "sft", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', "body"),
    ],
)
def test_lone_surrogate_is_a_400(app, raw, param):
    err = openai_error(post(app, "/v1/chat/completions", raw), 400)
    assert err["param"] == param and "Unicode" in err["message"]
    r = post(app, "/v1/completions", '{"model": "sft", "prompt": ["ok", "\\ud800"]}')
    assert openai_error(r, 400)["param"] == "prompt[1]"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", True),
        ("temperature", "1"),
        ("n", 1.5),
        ("n", True),
        ("max_tokens", "4"),
        ("stream", "yes"),
        ("temperature", float("nan")),
    ],
)
def test_numbers_are_strict(app, field, value):
    raw = json.dumps({"model": "sft", "messages": HI, field: value})  # NaN: Python's json writes it, as some clients do
    assert openai_error(post(app, "/v1/chat/completions", raw), 400)["param"] == field


def test_chat_page_api_has_the_same_rules(app):
    """/api/chat (the chat page) takes the same body: its errors are the same 400s."""
    c = TestClient(app)
    sign_in(c, "ann")
    h = {"X-CSRF-Token": csrf_of(c)}
    r = c.post("/api/chat", json={"model": "sft", "messages": HI, "tools": [TOOL]}, headers=h)
    assert openai_error(r, 400)["param"] == "tools"
    r = c.post(
        "/api/chat",
        json={
            "model": "sft",
            "messages": HI,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=h,
    )
    assert r.status_code == 200 and '"completion_tokens": 2' in r.text.split("data: ")[-2]


def test_rate_limit_is_openais_shape(tiny_path, tmp_path):
    run = make_run(tmp_path, tiny_path)
    app = create_app(ServeConfig(run=str(run), max_new_tokens=2, precision="fp32", rate_limit=1))
    app.state.store.create_user("eve", password="password123")
    app.key = app.state.store.new_api_key("eve")
    body = {"model": "sft", "messages": HI, "max_tokens": 1}
    assert post(app, "/v1/chat/completions", body).status_code == 200
    r = post(app, "/v1/chat/completions", body)
    assert openai_error(r, 429)["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
