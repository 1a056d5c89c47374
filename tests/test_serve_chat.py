"""`glmkit serve`'s chat and completions API through the official `openai` client, against one real
uvicorn server per module (conftest's `served`): replies, streams, tool calls, prompts and sampling
fields.

The model is a tiny random GLM with a glmkit-trained tokenizer. Where a test needs a known reply (a
tool call, a stop string) the server's `processor_hook` forces the model's tokens for prompts that
hold a marker (`serve_helpers.Script`); everything else is the model's own greedy output. Expected
values come from glmkit's own references: the renderer (`render`) for prompts, the engine and
`glmkit.infer.text` for replies.
"""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serve_helpers import MODEL, TIME, USER, WEATHER, ids_of, long_marker  # noqa: E402

from glmkit.chat.render import parse, render, stop_ids  # noqa: E402
from glmkit.infer.engine import Engine  # noqa: E402
from glmkit.infer.sampling import SamplingConfig  # noqa: E402
from glmkit.infer.text import generate, infill  # noqa: E402


def test_models_list(served_client):
    assert [m.id for m in served_client.models.list().data] == [MODEL]


def test_chat_equals_the_engine_alone(served_client, chat_model, chat_tok):
    r = served_client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    prompt = render(USER, None, "glm4", tokenizer=chat_tok).ids
    from glmkit.infer.engine import Request
    [alone] = Engine(chat_model, chat_tok, max_batch=1, max_len=1024).generate(
        [Request.chat(prompt, SamplingConfig(max_new_tokens=8), stop_ids=tuple(stop_ids("glm4", chat_tok)))])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat_tok.decode(alone.tokens[0]).strip()
    assert r.choices[0].finish_reason == ("length" if alone.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(alone.tokens[0])
    assert r.usage.total_tokens == len(prompt) + len(alone.tokens[0])


def test_stream_reassembled_by_the_client_equals_the_response(served_client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "你好"}]}],
              max_tokens=12, temperature=0)
    whole = served_client.chat.completions.create(**kw)
    with served_client.chat.completions.stream(**kw) as stream:
        kinds = {event.type for event in stream}
        final = stream.current_completion_snapshot     # get_final_completion() refuses finish_reason 'length'
    assert {"chunk", "content.delta", "content.done"} <= kinds
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    chunks = list(served_client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content


def test_raw_stream_ends_with_done_and_sends_keepalives(served, served_script, chat_tok):
    marker = served_script.add("SLOWPOKE", ids_of(chat_tok, "ok"))
    server, url = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1] if ln.startswith("data: ")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "ok"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_streams_equal_each_alone(served_client, served):
    """100 concurrent streamed requests (20 distinct, mixed lengths, greedy) give what each gives alone."""
    _, url = served
    cases = [([{"role": "user", "content": f"Question {i}: {'天气 ' * (i % 7)}how?"}], 4 + (i * 5) % 23)
             for i in range(20)]
    alone = [served_client.chat.completions.create(model=MODEL, messages=m, max_tokens=k, temperature=0)
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


def test_tool_call_auto_non_streamed_and_streamed(served_client, served_script, chat_tok):
    marker = served_script.add("CALLWEATHER", ids_of(chat_tok, 'get_weather\n{"city": "北京"}'))
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER], temperature=0)
    r = served_client.chat.completions.create(**kw)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
    chunks = list(served_client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])     # the id only in the first delta
    assert "".join(d.function.arguments for d in deltas) == '{"city": "北京"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with served_client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "北京"}'


def test_tool_choice_named_prefills_the_call(served_client, served_script, chat_tok):
    marker = served_script.add("NAMEDCALL", ids_of(chat_tok, '{"city": "上海"}'))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": marker}]
    r = served_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], temperature=0,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert served_script.prompts[-1] == render(messages, [WEATHER, TIME], "glm4", tokenizer=chat_tok,
                                               forced_tool="get_weather").ids
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "上海"}')


def test_tool_choice_required_makes_the_random_model_call(served_client):
    r = served_client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=6, temperature=0)
    msg = r.choices[0].message
    assert msg.content is None and msg.tool_calls[0].function.name in ("get_weather", "get_time")


def test_tool_choice_none_never_calls(served_client, served_script, chat_tok):
    r = served_client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none",
                                              max_tokens=6, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    marker = served_script.add("NONECALL", ids_of(chat_tok, 'get_weather\n{"city": "北京"}'))   # even a call's text
    r = served_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER],
                                              tool_choice="none", temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first(served_client, served_script, chat_tok):
    a = chat_tok.special_id("<|assistant|>")
    ids = chat_tok.encode('get_weather\n{"city": "北京"}') + [a] + chat_tok.encode('get_time\n{}') + \
        [chat_tok.special_id("<|observation|>")]
    marker = served_script.add("TWOCALLS", ids)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], tools=[WEATHER, TIME], temperature=0)
    both = served_client.chat.completions.create(**kw)
    one = served_client.chat.completions.create(**kw, parallel_tool_calls=False)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tools", [None, [WEATHER]])
def test_prompt_is_the_renderers_and_keeps_the_system_prompt(served_client, served_script, chat_tok, tools):
    messages = [{"role": "system", "content": "You are a pirate."}, *USER,
                {"role": "assistant", "content": "Let me check."}, {"role": "user", "content": "Well?"}]
    served_client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=2, temperature=0)
    assert served_script.prompts[-1] == render(messages, tools, "glm4", tokenizer=chat_tok).ids
    assert "You are a pirate." in chat_tok.decode(served_script.prompts[-1])


def test_stop_cuts_the_content(served_client, served_script, chat_tok):
    marker = served_script.add("STOPTEST", ids_of(chat_tok, "Hello world. Bye"))
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0, stop=["world", "zzz"])
    r = served_client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello ", "stop")
    chunks = list(served_client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed(served_client):
    kw = dict(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=7)
    two = served_client.chat.completions.create(**kw, n=2)
    one = served_client.chat.completions.create(**kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content
    again = served_client.chat.completions.create(**{**kw, "seed": 8})
    assert two.choices[1].message.content == again.choices[0].message.content
    assert two.usage.completion_tokens == one.usage.completion_tokens + again.usage.completion_tokens


def test_logprobs(served_client):
    r = served_client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                              top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for entry in lp:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)    # greedy: the best is chosen
        assert entry.logprob <= 0


def test_max_completion_tokens_and_length(served_client, served_script, chat_tok):
    marker = long_marker(served_script, chat_tok)
    r = served_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}],
                                              max_completion_tokens=3, temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    ref = parse((chat_tok.encode(" la") * 2)[:3], "glm4", chat_tok, finish_reason="length")
    assert r.choices[0].message.content == ref.content


def test_ignore_eos_decodes_max_tokens_past_the_stop(served_client, served_script, chat_tok):
    """vLLM's `ignore_eos` (what `glmkit bench serve` sends): a reply that would stop after 2 tokens
    goes on to max_tokens, in chat and in plain completions, streamed or not."""
    marker = served_script.add("EOSTEST", ids_of(chat_tok, "Hi"))          # "Hi" then <|observation|>, repeated
    kw = dict(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0, max_tokens=6)
    short = served_client.chat.completions.create(**kw)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (len(chat_tok.encode("Hi")), "stop")
    full = served_client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (full.usage.completion_tokens, full.choices[0].finish_reason) == (6, "length")
    chunks = list(served_client.chat.completions.create(**kw, extra_body={"ignore_eos": True}, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    text = served_client.completions.create(model=MODEL, prompt=marker, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert (text.usage.completion_tokens, text.choices[0].finish_reason) == (6, "length")


def test_completions_continue_and_fill_blanks(served_client, chat_model, chat_tok):
    r = served_client.completions.create(model=MODEL, prompt="The weather in Beijing", max_tokens=6, temperature=0)
    [want] = generate(chat_model, chat_tok, "The weather in Beijing", SamplingConfig(max_new_tokens=6))
    assert r.choices[0].text == want
    text = "Hello! [MASK] weather in [MASK] is sunny."
    r = served_client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0)
    ref = infill(chat_model, chat_tok, text, SamplingConfig(max_new_tokens=4))[0]
    assert r.choices[0].model_extra["fills"] == ref.fills and r.choices[0].text == ref.text
    pieces = list(served_client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, stream=True))
    got = ["", ""]
    for p in pieces:
        got[p.choices[0].model_extra["blank"]] += p.choices[0].text
    assert got == ref.fills
