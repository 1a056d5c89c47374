"""`glmkit serve` through the official `openai` client, against a real uvicorn server on 127.0.0.1.

The model is a tiny random GLM with a glmkit-trained tokenizer. Where a test needs a known reply (a
tool call, a stop string) the server's `processor_hook` forces the model's tokens for prompts that
hold a marker; everything else is the model's own greedy output. Expected values come from glmkit's
own references: the renderer (`render`) for prompts, the engine and `glmkit.infer.text` for replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from glmkit.chat.render import parse, render, stop_ids  # noqa: E402
from glmkit.infer.engine import Engine  # noqa: E402
from glmkit.infer.sampling import SamplingConfig  # noqa: E402
from glmkit.infer.text import generate, infill  # noqa: E402
from glmkit.model.config import GLMConfig  # noqa: E402
from glmkit.model.glm import GLM  # noqa: E402
from glmkit.serve.app import ServeConfig, Server, create_app  # noqa: E402
from glmkit.serve.chat import plan_chat  # noqa: E402
from glmkit.serve.protocol import ChatCompletionRequest  # noqa: E402

MODEL = "tiny-chat"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "the time",
                                         "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Beijing?"}]


@pytest.fixture(scope="module")
def model(chat_tok):
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny", vocab_size=len(chat_tok), max_position_embeddings=1024)).eval()


class Script:
    """The server's processor_hook: a prompt holding a marker gets the marker's token ids forced (the
    last one repeats; "raise" makes the engine step fail there); every prompt is recorded."""

    def __init__(self, tok):
        self.tok, self.scripts, self.prompts = tok, {}, []

    def add(self, marker: str, ids: list[int]) -> str:
        self.scripts[marker] = ids
        return marker

    def __call__(self, prompt: list[int]):
        self.prompts.append(prompt)
        text = self.tok.decode(prompt)
        ids = next((ids for m, ids in self.scripts.items() if m in text), None)
        if ids is None:
            return None

        def force(produced, row):
            want = ids[min(len(produced), len(ids) - 1)]       # the last id repeats
            if want == "raise":
                raise RuntimeError("scripted failure")
            out = torch.full_like(row, float("-inf"))
            out[want] = 0.0
            return out
        return force


@contextlib.contextmanager
def serving(model, tok, *, max_batch=8, max_len=1024, **config):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields (server, base_url)."""
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len)
    with running(Server(engine, tok, ServeConfig(model_name=MODEL, **config))) as s:
        yield s


@contextlib.contextmanager
def running(server: Server):
    """`server` behind a real uvicorn on 127.0.0.1 (a free port) in a thread; yields (server, base_url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def script(chat_tok):
    return Script(chat_tok)


@pytest.fixture(scope="module")
def served(model, chat_tok, script):
    with serving(model, chat_tok, max_batch=16, processor_hook=script, keepalive_s=0.5, max_waiting=128) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=60)


def ids_of(tok, text: str, fmt_stop: str = "<|observation|>") -> list[int]:
    return tok.encode(text) + [tok.special_id(fmt_stop)]


# ------------------------------------------------------------------------------------ the basics

def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_equals_the_engine_alone(client, model, chat_tok):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    prompt = render(USER, None, "glm4", tokenizer=chat_tok).ids
    from glmkit.infer.engine import Request
    [alone] = Engine(model, chat_tok, max_batch=1, max_len=1024).generate(
        [Request.chat(prompt, SamplingConfig(max_new_tokens=8), stop_ids=tuple(stop_ids("glm4", chat_tok)))])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat_tok.decode(alone.tokens[0]).strip()
    assert r.choices[0].finish_reason == ("length" if alone.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(alone.tokens[0])
    assert r.usage.total_tokens == len(prompt) + len(alone.tokens[0])


def test_stream_reassembled_by_the_client_equals_the_response(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "你好"}]}],
              max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    with client.chat.completions.stream(**kw) as stream:
        kinds = {event.type for event in stream}
        final = stream.current_completion_snapshot     # get_final_completion() refuses finish_reason 'length'
    assert {"chunk", "content.delta", "content.done"} <= kinds
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content


def test_raw_stream_ends_with_done_and_sends_keepalives(served, script, chat_tok):
    marker = script.add("SLOWPOKE", ids_of(chat_tok, "ok"))
    server, url = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1] if ln.startswith("data: ")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "ok"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------------------ tool calls

def test_tool_call_auto_non_streamed_and_streamed(client, script, chat_tok):
    marker = script.add("CALLWEATHER", ids_of(chat_tok, 'get_weather\n{"city": "北京"}'))
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER], temperature=0)
    r = client.chat.completions.create(**kw)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])     # the id only in the first delta
    assert "".join(d.function.arguments for d in deltas) == '{"city": "北京"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "北京"}'


def test_tool_choice_named_prefills_the_call(client, script, chat_tok):
    marker = script.add("NAMEDCALL", ids_of(chat_tok, '{"city": "上海"}'))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": marker}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert script.prompts[-1] == render(messages, [WEATHER, TIME], "glm4", tokenizer=chat_tok,
                                        forced_tool="get_weather").ids
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "上海"}')


def test_tool_choice_required_makes_the_random_model_call(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=6, temperature=0)
    msg = r.choices[0].message
    assert msg.content is None and msg.tool_calls[0].function.name in ("get_weather", "get_time")


def test_tool_choice_none_never_calls(client, script, chat_tok):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none",
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    marker = script.add("NONECALL", ids_of(chat_tok, 'get_weather\n{"city": "北京"}'))   # even a call's text
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER],
                                       tool_choice="none", temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice", ["none", "required"])
def test_tool_choice_processors(chat_tok, choice):
    """The constraint itself: on random logits, the first tokens chosen under it open a text block (none)
    or spell a declared name and its newline (required)."""
    from glmkit.infer.detok import TokenBytes
    table = TokenBytes(chat_tok).table
    req = ChatCompletionRequest(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=choice)
    plan = plan_chat(req, "glm4", chat_tok, table)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        produced: list[int] = []
        for _ in range(12):
            row = plan.processor(produced, torch.randn(len(chat_tok), generator=g))
            produced.append(int(row.argmax()))
        text = b"".join(table[t] for t in produced)
        if choice == "none":
            assert text.startswith(b"\n") and chat_tok.special_id("<|assistant|>") not in produced[1:]
        else:
            assert text.startswith((b"get_weather\n", b"get_time\n")), text


def test_glm45_required_prefills_up_to_tool_call(chat_tok):
    from glmkit.infer.detok import TokenBytes
    req = ChatCompletionRequest(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required")
    plan = plan_chat(req, "glm45", chat_tok, TokenBytes(chat_tok).table)
    forced = render(USER, [WEATHER], "glm45", tokenizer=chat_tok, forced_tool="get_weather").ids
    plain = render(USER, [WEATHER], "glm45", tokenizer=chat_tok).ids
    assert plan.prompt == forced[:len(plan.prompt)] and plan.prompt[-1] == chat_tok.special_id("<tool_call>")
    assert plan.prompt[:len(plain)] == plain and plan.prefill == plan.prompt[len(plain):]


def test_glm45_reasoning_and_calls(model, chat_tok):
    tok = chat_tok
    sp = tok.special_id
    reply = ([sp("<think>")] + tok.encode("Need the weather.") + [sp("</think>")] + tok.encode("\n")
             + [sp("<tool_call>")] + tok.encode("get_weather\n") + [sp("<arg_key>")] + tok.encode("city")
             + [sp("</arg_key>")] + tok.encode("\n") + [sp("<arg_value>")] + tok.encode("北京") + [sp("</arg_value>")]
             + tok.encode("\n") + [sp("</tool_call>"), sp("<|observation|>")])
    script = Script(tok)
    script.add("Weather in", reply)
    with serving(model, tok, fmt="glm45", processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0)
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0, stream=True))
    msg = r.choices[0].message
    assert msg.reasoning_content == "Need the weather."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "北京"}
    assert r.choices[0].finish_reason == "tool_calls"
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == "Need the weather."


def test_glm45_thinking_off(model, chat_tok):
    script = Script(chat_tok)
    with serving(model, chat_tok, fmt="glm45", processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert script.prompts[0] == render(USER, None, "glm45", tokenizer=chat_tok, enable_thinking=False).ids
    assert script.prompts[1] == render(USER, None, "glm45", tokenizer=chat_tok).ids
    assert script.prompts[0] != script.prompts[1]


def test_parallel_tool_calls_false_keeps_the_first(client, script, chat_tok):
    a = chat_tok.special_id("<|assistant|>")
    ids = chat_tok.encode('get_weather\n{"city": "北京"}') + [a] + chat_tok.encode('get_time\n{}') + \
        [chat_tok.special_id("<|observation|>")]
    marker = script.add("TWOCALLS", ids)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER, TIME], temperature=0)
    both = client.chat.completions.create(**kw)
    one = client.chat.completions.create(**kw, parallel_tool_calls=False)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"


# ------------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_prompt_is_the_renderers_and_keeps_the_system_prompt(client, script, chat_tok, tools):
    messages = [{"role": "system", "content": "You are a pirate."}, *USER,
                {"role": "assistant", "content": "Let me check."}, {"role": "user", "content": "Well?"}]
    client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=2, temperature=0)
    assert script.prompts[-1] == render(messages, tools, "glm4", tokenizer=chat_tok).ids
    assert "You are a pirate." in chat_tok.decode(script.prompts[-1])


def test_a_checkpoints_own_template_renders_the_prompt(model, chat_tok):
    """With a chat template (here glmkit's glm45 one, which renders what the renderer does) the prompt is
    the template's; a named call is opened after its generation prompt as the renderer opens it."""
    from glmkit.chat import chat_template
    from glmkit.chat.template import render_template
    script = Script(chat_tok)
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    with serving(model, chat_tok, fmt="glm45", template=chat_template("glm45"), processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=2, temperature=0)
        r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert script.prompts[0] == render_template(chat_template("glm45"), messages, [WEATHER], tokenizer=chat_tok).ids
    assert script.prompts[0] == render(messages, [WEATHER], "glm45", tokenizer=chat_tok).ids
    assert script.prompts[1] == render(messages, [WEATHER], "glm45", tokenizer=chat_tok, forced_tool="get_weather").ids
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


# ------------------------------------------------------------------------------------ sampling fields

def test_stop_cuts_the_content(client, script, chat_tok):
    marker = script.add("STOPTEST", ids_of(chat_tok, "Hello world. Bye"))
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0, stop=["world", "zzz"])
    r = client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello ", "stop")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=7)
    two = client.chat.completions.create(**kw, n=2)
    one = client.chat.completions.create(**kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content
    again = client.chat.completions.create(**{**kw, "seed": 8})
    assert two.choices[1].message.content == again.choices[0].message.content
    assert two.usage.completion_tokens == one.usage.completion_tokens + again.usage.completion_tokens


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for entry in lp:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)    # greedy: the best is chosen
        assert entry.logprob <= 0


def test_max_completion_tokens_and_length(client, script, chat_tok):
    marker = _long(script, chat_tok)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}],
                                       max_completion_tokens=3, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    ref = parse((chat_tok.encode(" la") * 2)[:3], "glm4", chat_tok, finish_reason="length")
    assert r.choices[0].message.content == ref.content


def test_ignore_eos_decodes_max_tokens_past_the_stop(client, script, chat_tok):
    """vLLM's `ignore_eos` (what `glmkit bench serve` sends): a reply that would stop after 2 tokens
    goes on to max_tokens, in chat and in plain completions, streamed or not."""
    marker = script.add("EOSTEST", ids_of(chat_tok, "Hi"))          # "Hi" then <|observation|>, repeated
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0, max_tokens=6)
    short = client.chat.completions.create(**kw)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (len(chat_tok.encode("Hi")), "stop")
    full = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (full.usage.completion_tokens, full.choices[0].finish_reason) == (6, "length")
    chunks = list(client.chat.completions.create(**kw, extra_body={"ignore_eos": True}, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    text = client.completions.create(model=MODEL, prompt=marker, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert (text.usage.completion_tokens, text.choices[0].finish_reason) == (6, "length")


# ------------------------------------------------------------------------------------ completions

def test_completions_continue_and_fill_blanks(client, model, chat_tok):
    r = client.completions.create(model=MODEL, prompt="The weather in Beijing", max_tokens=6, temperature=0)
    assert r.choices[0].text == generate(model, chat_tok, "The weather in Beijing", SamplingConfig(max_new_tokens=6))[0]
    text = "Hello! [MASK] weather in [MASK] is sunny."
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0)
    ref = infill(model, chat_tok, text, SamplingConfig(max_new_tokens=4))[0]
    assert r.choices[0].model_extra["fills"] == ref.fills and r.choices[0].text == ref.text
    pieces = list(client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, stream=True))
    got = ["", ""]
    for p in pieces:
        got[p.choices[0].model_extra["blank"]] += p.choices[0].text
    assert got == ref.fills


# ------------------------------------------------------------------------------------ errors

def test_error_statuses_map_to_the_client_exceptions(client, served, model, chat_tok):
    server, url = served
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format" and "not supported" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "天气 " * 2000}])
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1020)
    assert "lower max_tokens to" in e.value.message
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"]


def test_api_key(model, chat_tok):
    with serving(model, chat_tok, api_key="s3cret") as (_, url):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret").models.list()] == [MODEL]
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_internal_errors_are_500_and_an_error_event_mid_stream(client, script, chat_tok):
    marker = script.add("BREAKME", chat_tok.encode("a b c") + ["raise"])
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=20, temperature=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**kw)
    got = []
    with pytest.raises(openai.APIError, match="scripted failure"):
        for c in client.chat.completions.create(**kw, stream=True):
            got.append(c)
    assert got and got[0].choices[0].delta.role == "assistant"
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)   # still serving
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------------ load

def test_concurrent_streams_equal_each_alone(client, served):
    """100 concurrent streamed requests (20 distinct, mixed lengths, greedy) give what each gives alone."""
    _, url = served
    cases = [([{"role": "user", "content": f"Question {i}: {'天气 ' * (i % 7)}how?"}], 4 + (i * 5) % 23)
             for i in range(20)]
    alone = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=k, temperature=0)
             for m, k in cases]

    async def one(aclient, m, k):
        stream = await aclient.chat.completions.create(model=MODEL, messages=m, max_tokens=k, temperature=0,
                                                       stream=True)
        text, finish = "", None
        async for c in stream:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        return text, finish

    async def all_of():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*[one(aclient, *cases[i % 20]) for i in range(100)]), 120)

    results = asyncio.run(all_of())
    for i, (text, finish) in enumerate(results):
        ref = alone[i % 20].choices[0]
        assert (text, finish) == (ref.message.content, ref.finish_reason), i


def _long(script, tok) -> str:
    return script.add("FOREVER", tok.encode(" la") * 2000)


def test_disconnect_cancels_and_frees_the_row(served, script, chat_tok):
    server, url = served
    marker = _long(script, chat_tok)
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 900}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
    deadline = time.time() + 10
    while server.loop.in_flight or server.engine.running:
        assert time.time() < deadline, "the disconnected request still runs"
        time.sleep(0.05)


def test_full_queue_is_429_then_a_retry_succeeds(model, chat_tok):
    script = Script(chat_tok)
    marker = _long(script, chat_tok)
    with serving(model, chat_tok, max_batch=1, max_waiting=0, processor_hook=script) as (server, url):
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


def test_metrics(model, chat_tok):
    script = Script(chat_tok)
    marker = _long(script, chat_tok)
    with serving(model, chat_tok, processor_hook=script) as (_, url):
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


# ------------------------------------------------------------------------------------ the command

@pytest.mark.slow
def test_glmkit_serve_command(tiny_run):
    """The command as users run it: prints the URL and a client snippet, answers the client, stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", str(tiny_run.directory), "--port", str(port),
                             "--api-key", "k", "--model-name", "toy"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        head = [proc.stdout.readline() for _ in range(3)]
        url = f"http://127.0.0.1:{port}/v1"
        assert url in head[0] and head[2].startswith("from openai import OpenAI")
        assert "glm45 chat format" in head[0]          # as `glmkit chat` chooses: the tokenizer has GLM-4.5's tokens
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=5)
        deadline = time.time() + 60
        while True:
            try:
                models = c.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["toy"]
        r = c.chat.completions.create(model="toy", messages=USER, max_tokens=3, temperature=0)
        from glmkit.checkpoint.loader import load
        from glmkit.infer.engine import Request
        loaded = load(tiny_run.directory)
        prompt = render(USER, None, "glm45", tokenizer=loaded.tokenizer).ids
        [alone] = Engine(loaded.model, loaded.tokenizer, max_batch=1).generate([Request.chat(
            prompt, SamplingConfig(max_new_tokens=3), stop_ids=tuple(stop_ids("glm45", loaded.tokenizer)))])
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone.tokens[0]))
        assert r.choices[0].finish_reason == ("length" if alone.finish_reason == "length" else "stop")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_quantized_weights_and_fp8_cache_from_the_command_line(tiny_run):
    """`glmkit serve --quantize int8 --kv-dtype fp8` builds its engine so (`make_server`, the command's
    own code), and a reply over HTTP equals the same quantized model's engine alone."""
    from glmkit.checkpoint.loader import load
    from glmkit.cli import serve as serve_cli
    from glmkit.cli import verb_parser
    from glmkit.infer.engine import Request
    from glmkit.model.quantize import QuantizedLinear

    args = verb_parser("serve").parse_args([str(tiny_run.directory), "--quantize", "int8", "--kv-dtype", "fp8",
                                            "--model-name", MODEL, "--max-len", "256"])
    server, name, chosen = serve_cli.make_server(args, [])
    assert name == MODEL and server.engine.pool.dtype == torch.float8_e4m3fn
    assert all(isinstance(b.self_attn.qkv_proj, QuantizedLinear) for b in server.engine.model.layers)
    with running(server) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0)
        text = c.completions.create(model=MODEL, prompt="The weather in Beijing", max_tokens=6, temperature=0)
    loaded = load(tiny_run.directory, quantize="int8")
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=256, kv_dtype="fp8")
    [want] = generate(loaded.model, loaded.tokenizer, "The weather in Beijing", SamplingConfig(max_new_tokens=6),
                      engine=engine)
    assert text.usage.completion_tokens > 0 and text.choices[0].text == want
    prompt = render(USER, None, chosen.dialect, tokenizer=loaded.tokenizer).ids
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=256, kv_dtype="fp8")
    [alone] = engine.generate([Request.chat(prompt, SamplingConfig(max_new_tokens=6),
                                            stop_ids=tuple(stop_ids(chosen.dialect, loaded.tokenizer)))])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone.tokens[0]))
    finish = "length" if alone.finish_reason == "length" else "stop"
    assert r.choices[0].finish_reason == finish
    message = parse(alone.tokens[0], chosen.dialect, loaded.tokenizer, finish_reason=finish)
    assert (r.choices[0].message.content or None) == message.content


# ------------------------------------------------------------------------------------ server-side tools

class FakeSandbox:
    """Stands in for `glmkit.chat.sandbox.Sandbox`: evaluates one expression (no kernel needed)."""

    def __init__(self, folder):
        self.folder, self.runs, self.closed = folder, [], False

    def run(self, code):
        self.runs.append(code)
        text = str(eval(code.removeprefix("print(").removesuffix(")"), {}))

        class Result:
            def as_observation(self, max_chars):
                return text
        return Result()

    def close(self):
        self.closed = True


class TwoRounds:
    """A hook: a prompt without a tool result gets `first` forced, one with a result gets `then`."""

    def __init__(self, tok, first: list[int], then: list[int]):
        self.tok, self.first, self.then, self.prompts = tok, first, then, []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        ids = self.then if self.tok.special_id("<|observation|>") in prompt else self.first
        def force(produced, row):
            out = torch.full_like(row, float("-inf"))
            out[ids[min(len(produced), len(ids) - 1)]] = 0.0
            return out
        return force


def test_server_side_python_runs_on_the_server(model, chat_tok, tmp_path):
    from glmkit.chat.agent import Toolbox
    from glmkit.serve.tools import ServerTools
    tok = chat_tok
    boxes = {}

    def make(folder):
        boxes[folder.name] = sandbox = FakeSandbox(folder)
        return Toolbox(sandbox=sandbox)
    tools = ServerTools(make, tmp_path, "glm4")
    obs, eot = tok.special_id("<|observation|>"), tok.special_id("<|endoftext|>")
    hook = TwoRounds(tok, tok.encode("python\nprint(6*7)") + [obs], tok.encode("\nIt is 42.") + [eot])
    with serving(model, tok, processor_hook=hook, tools=tools) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "6*7?"}], temperature=0, user="alice")
        r = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("It is 42.", "stop")
    assert r.choices[0].message.tool_calls is None
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "It is 42."
    [box] = boxes.values()                                # one sandbox for alice's conversation
    assert box.runs == ["print(6*7)", "print(6*7)"]
    second = render([{"role": "user", "content": "6*7?"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "x", "type": "function", "function": {"name": "python",
                                                                      "arguments": '{"code": "print(6*7)"}'}}]},
                     {"role": "tool", "tool_call_id": "x", "content": "42"}], [{"type": "python"}], "glm4",
                    tokenizer=tok).ids
    assert hook.prompts[1] == second                      # the call and its result joined the conversation
    assert r.usage.prompt_tokens == len(hook.prompts[0]) + len(second)
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    tools.close()
    assert box.closed


def test_server_tools_return_the_clients_calls(model, chat_tok, tmp_path):
    from glmkit.chat.agent import Toolbox
    from glmkit.serve.tools import ServerTools
    tok = chat_tok
    tools = ServerTools(lambda folder: Toolbox(sandbox=FakeSandbox(folder)), tmp_path, "glm4")
    obs = tok.special_id("<|observation|>")
    hook = TwoRounds(tok, tok.encode('get_weather\n{"city": "北京"}') + [obs], [obs])
    with serving(model, tok, processor_hook=hook, tools=tools) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, r.choices[0].finish_reason) == (
        "get_weather", '{"city": "北京"}', "tool_calls")
    assert hook.prompts[0] == render(USER, [{"type": "python"}, WEATHER], "glm4", tokenizer=tok).ids


@pytest.mark.slow
def test_server_side_python_in_the_real_sandbox(model, chat_tok, tmp_path):
    from glmkit.chat.agent import Toolbox
    from glmkit.chat.sandbox import Sandbox, sandbox_problem
    from glmkit.serve.tools import ServerTools
    if sandbox_problem() is not None:
        pytest.skip(f"no sandbox here: {sandbox_problem()}")
    tok = chat_tok
    import tempfile
    short = tempfile.mkdtemp(prefix="gks")             # the kernel's socket paths must stay short
    tools = ServerTools(lambda folder: Toolbox(sandbox=Sandbox(folder)), short, "glm4")
    obs, eot = tok.special_id("<|observation|>"), tok.special_id("<|endoftext|>")
    hook = TwoRounds(tok, tok.encode("python\nprint(6*7)") + [obs], tok.encode("\nDone.") + [eot])
    with serving(model, tok, processor_hook=hook, tools=tools) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "6*7?"}], temperature=0,
                                      extra_headers={"X-Conversation-Id": "t1"})
    tools.close()
    shutil.rmtree(short, ignore_errors=True)
    assert r.choices[0].message.content == "Done."
    assert "42" in tok.decode(hook.prompts[1][len(hook.prompts[0]):])      # the kernel's output, read by the model
