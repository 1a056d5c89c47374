"""`glmkit serve` when things go wrong, and what its operator sees: error statuses as the `openai`
client's exceptions, the API key, an engine failure (500, or an error event mid-stream), a full queue
(429), a client that disconnects, and the Prometheus metrics.
"""

from __future__ import annotations

import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serve_helpers import MODEL, USER, Script, long_marker, serving  # noqa: E402


@pytest.mark.parametrize("fields, error, body, says", [
    (dict(model="gpt-4o", messages=USER), openai.NotFoundError, {"code": "model_not_found"}, ""),
    (dict(model=MODEL, messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError,
     {"param": "messages[0].role"}, ""),
    (dict(model=MODEL, messages=USER, temperature=5), openai.BadRequestError, {"param": "temperature"}, ""),
    (dict(model=MODEL, messages=USER, response_format={"type": "json_object"}), openai.BadRequestError,
     {"param": "response_format"}, "not supported"),
    (dict(model=MODEL, messages=[{"role": "user", "content": "天气 " * 2000}]), openai.BadRequestError,
     {"code": "context_length_exceeded"}, "1024"),
    (dict(model=MODEL, messages=USER, max_tokens=1020), openai.BadRequestError, {}, "lower max_tokens to"),
], ids=["unknown-model", "bad-role", "bad-temperature", "response-format", "prompt-too-long", "max-tokens-too-many"])
def test_error_statuses_map_to_the_client_exceptions(served_client, fields, error, body, says):
    with pytest.raises(error) as e:
        served_client.chat.completions.create(**fields)
    assert {key: e.value.body[key] for key in body} == body
    assert says in e.value.message


def test_a_body_that_is_not_json_is_400_with_an_openai_error(served):
    _, url = served
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"]


def test_api_key(chat_model, chat_tok):
    with serving(chat_model, chat_tok, api_key="s3cret") as (_, url):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret").models.list()] == [MODEL]
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_internal_errors_are_500_and_an_error_event_mid_stream(served_client, served_script, chat_tok):
    marker = served_script.add("BREAKME", chat_tok.encode("a b c") + ["raise"])
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=20, temperature=0)
    with pytest.raises(openai.InternalServerError):
        served_client.chat.completions.create(**kw)
    got = []
    with pytest.raises(openai.APIError, match="scripted failure"):
        for c in served_client.chat.completions.create(**kw, stream=True):
            got.append(c)
    assert got and got[0].choices[0].delta.role == "assistant"
    r = served_client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)   # still serving
    assert r.usage.completion_tokens >= 1


def test_full_queue_is_429_then_a_retry_succeeds(chat_model, chat_tok):
    script = Script(chat_tok)
    marker = long_marker(script, chat_tok)
    with serving(chat_model, chat_tok, max_batch=1, max_waiting=0, processor_hook=script) as (server, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 900}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()          # kept: a dropped iterator closes the connection
            next(lines)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
        deadline = time.time() + 10
        while server.loop.in_flight:
            assert time.time() < deadline
            time.sleep(0.05)
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_disconnect_cancels_and_frees_the_row(served, served_script, chat_tok):
    server, url = served
    marker = long_marker(served_script, chat_tok)
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 900}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
    deadline = time.time() + 10
    while server.loop.in_flight or server.engine.running:
        assert time.time() < deadline, "the disconnected request still runs"
        time.sleep(0.05)


def test_metrics(chat_model, chat_tok):
    script = Script(chat_tok)
    marker = long_marker(script, chat_tok)
    with serving(chat_model, chat_tok, processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        for _ in range(2):
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=4)
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if not ln.startswith("#"))
    assert lines['glmkit_requests_total{endpoint="/v1/chat/completions",status="200"}'] == "2"
    assert lines["glmkit_generation_tokens_total"] == "8"
    assert lines["glmkit_prompt_tokens_total"] == str(2 * r.usage.prompt_tokens)
    assert lines["glmkit_time_to_first_token_seconds_count"] == "2"
    assert lines['glmkit_time_to_first_token_seconds_bucket{le="+Inf"}'] == "2"
    assert float(lines["glmkit_generation_tokens_per_second"]) == pytest.approx(0.8)
    assert lines["glmkit_requests_running"] == "0" and lines["glmkit_requests_waiting"] == "0"
