"""The agent loop (glmkit/chat/agent.py) on the real engine, with a scripted model: a logits processor
that forces each round's token ids, so the engine, the format's parser, the function registry, the
sandboxed interpreter, the browser and the transcript all run for real and the transcript is known."""

import json
import threading

import pytest

from glmkit.chat.agent import (
    Agent,
    ChatFormat,
    ScriptedModel,
    Toolbox,
    ToolRun,
    TurnEnd,
    cap_observation,
    choose_format,
    read_chat_template,
    read_transcript,
)
from glmkit.chat.browser import Browser
from glmkit.chat.docstore import build_store
from glmkit.chat.render import chat_template, render
from glmkit.chat.stream import Delta
from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

DOCS = [("Weather report", "notes/weather.txt", "The weather in Beijing is sunny.\nIt is 3 degrees today."),
        ("Cats", "notes/cats.txt", "A small cat sat on the warm mat.")]


def get_weather(city: str) -> dict:
    """Look up the weather of a city.

    Args:
        city: The city name.
    """
    return {"city": city, "temp": 3}


def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


@pytest.fixture(scope="module")
def engine(chat_tok):
    import torch
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=len(chat_tok), max_position_embeddings=4096)).eval()
    return Engine(model, chat_tok, max_batch=2, max_len=4096)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(DOCS, tmp_path_factory.mktemp("store") / "docs.sqlite")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from glmkit.chat.sandbox import Limits, Sandbox, sandbox_problem
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(f"no sandbox on this machine: {problem}")
    box = Sandbox(tmp_path_factory.mktemp("ws"), Limits(timeout_s=10))
    yield box
    box.close()


def chat(engine, tok, texts, tools, fmt="glm4", **kw):
    script = ScriptedModel.from_texts(tok, texts)
    agent = Agent(engine, tok, fmt=fmt, tools=tools, logits_processor=script, clock=lambda: 0.0, **kw)
    return agent, script


def drain(agent, text):
    events = list(agent.send(text))
    assert isinstance(events[-1], TurnEnd)
    return events


def tool_event(round_, id_, name, arguments, result, error=None, truncated=False):
    return {"event": "tool", "round": round_, "id": id_, "name": name, "arguments": arguments, "result": result,
            "error": error, "duration_s": 0.0, "truncated": truncated}


def prompt_sizes(agent):
    return [e["tokens"] for e in agent.transcript.events if e["event"] == "prompt"]


def test_python_then_browser_then_a_function_glm4(engine, chat_tok, store, sandbox, tmp_path):
    texts = ['python\nx = 6 * 7\nprint(x)<|observation|>',
             'simple_browser\nsearch("weather Beijing")<|observation|>',
             'get_weather\n{"city": "北京"}<|observation|>',
             '\nIt is sunny, 3 degrees 【0†Weather report】.<|user|>']
    tools = Toolbox([get_weather], sandbox=sandbox, browser=Browser(store))
    agent, script = chat(engine, chat_tok, texts, tools, transcript=tmp_path / "t.jsonl")
    reused = engine.reused_tokens
    events = drain(agent, "Weather in Beijing?")
    reused = engine.reused_tokens - reused
    assert script.done
    results = Browser(store).search("weather Beijing")          # what a fresh browser shows for that query
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert [(r.name, r.result) for r in runs] == [("python", "42"), ("simple_browser", results),
                                                   ("get_weather", '{"city": "北京", "temp": 3}')]
    content = "".join(e.content or "" for e in events if isinstance(e, Delta))
    assert content == "It is sunny, 3 degrees 【0†Weather report】."
    end = events[-1]
    assert (end.reason, end.rounds, end.calls) == ("answer", 4, 3)
    assert agent.tools.browser.check_citations(content)[0].valid
    sizes = prompt_sizes(agent)
    assert sizes[0] == len(render([{"role": "user", "content": "Weather in Beijing?"}], tools.specs(), "glm4",
                                  tokenizer=chat_tok).ids)
    calls = [{"id": "call_1", "type": "function", "function": {"name": "python",
                                                               "arguments": '{"code": "x = 6 * 7\\nprint(x)"}'}}]
    expected = [
        {"event": "user", "content": "Weather in Beijing?"},
        {"event": "prompt", "round": 1, "tokens": sizes[0]},
        {"event": "assistant", "round": 1, "message": {"role": "assistant", "content": None, "tool_calls": calls},
         "finish_reason": "tool_calls", "tokens": len(chat_tok.encode(texts[0], allow_special=True)) - 1,
         "parse_errors": []},
        tool_event(1, "call_1", "python", '{"code": "x = 6 * 7\\nprint(x)"}', "42"),
        {"event": "prompt", "round": 2, "tokens": sizes[1]},
        {"event": "assistant", "round": 2, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "simple_browser",
                                                              "arguments": '{"command": "search(\\"weather Beijing\\")"}'}}]},
         "finish_reason": "tool_calls", "tokens": len(chat_tok.encode(texts[1], allow_special=True)) - 1,
         "parse_errors": []},
        tool_event(2, "call_2", "simple_browser", '{"command": "search(\\"weather Beijing\\")"}', results),
        {"event": "prompt", "round": 3, "tokens": sizes[2]},
        {"event": "assistant", "round": 3, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
         "finish_reason": "tool_calls", "tokens": len(chat_tok.encode(texts[2], allow_special=True)) - 1,
         "parse_errors": []},
        tool_event(3, "call_3", "get_weather", '{"city": "北京"}', '{"city": "北京", "temp": 3}'),
        {"event": "prompt", "round": 4, "tokens": sizes[3]},
        {"event": "assistant", "round": 4, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop", "tokens": len(chat_tok.encode(texts[3], allow_special=True)) - 1, "parse_errors": []},
        {"event": "end", "reason": "answer", "rounds": 4, "calls": 3},
    ]
    assert agent.transcript.events == expected
    assert read_transcript(tmp_path / "t.jsonl") == expected           # the file holds the same, line by line
    # each round's prompt is the previous one plus the reply and the observation: the engine reuses it
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert reused >= sum(sizes[:3])
    assert [m.role for m in agent.messages] == ["user"] + ["assistant", "tool"] * 3 + ["assistant"]


def test_glm45_python_browser_function(engine, chat_tok, store, sandbox):
    call = "<tool_call>{}\n{}</tool_call><|observation|>"
    arg = "<arg_key>{}</arg_key>\n<arg_value>{}</arg_value>\n"
    texts = ["<think>run it</think>\n" + call.format("python", arg.format("code", "print(2 ** 10)")),
             call.format("browser_search", arg.format("query", "cat")),
             call.format("get_weather", arg.format("city", "上海")),
             "<think></think>\nDone.<|user|>"]
    tools = Toolbox([get_weather], sandbox=sandbox, browser=Browser(store))
    agent, script = chat(engine, chat_tok, texts, tools, fmt="glm45")
    events = drain(agent, "go")
    runs = [e for e in events if isinstance(e, ToolRun)]
    assert [(r.name, r.arguments, r.result) for r in runs] == [
        ("python", '{"code": "print(2 ** 10)"}', "1024"),
        ("browser_search", '{"query": "cat"}', Browser(store).search("cat")),
        ("get_weather", '{"city": "上海"}', '{"city": "上海", "temp": 3}')]
    assert "".join(e.reasoning_content or "" for e in events if isinstance(e, Delta)) == "run it"
    assert events[-1].reason == "answer" and events[-1].message.content == "Done."
    assert [t["function"]["name"] for t in (s if isinstance(s, dict) else s.to_dict() for s in tools.specs())] == [
        "python", "browser_search", "browser_open", "browser_find", "get_weather"]


def test_parallel_calls_run_at_once_and_answer_in_call_order(engine, chat_tok):
    barrier = threading.Barrier(2, timeout=10)          # each call waits for the other: serial calls would fail

    def meet(name: str) -> str:
        """Wait for the other call."""
        barrier.wait()
        return f"met {name}"

    texts = ['meet\n{"name": "a"}<|assistant|>meet\n{"name": "b"}<|observation|>', "\nok<|user|>"]
    agent, _ = chat(engine, chat_tok, texts, Toolbox([meet]))
    events = drain(agent, "both")
    assert [(r.id, r.result, r.error) for r in events if isinstance(r, ToolRun)] == [
        ("call_1", "met a", None), ("call_2", "met b", None)]
    assert [m.to_dict() for m in agent.messages[1:]] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "meet", "arguments": '{"name": "a"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "meet", "arguments": '{"name": "b"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "met a"},
        {"role": "tool", "tool_call_id": "call_2", "content": "met b"},
        {"role": "assistant", "content": "ok"}]


def test_malformed_call_unknown_tool_and_tool_error_come_back_as_observations(engine, chat_tok):
    texts = ['get_weather\n{"city": 北京<|observation|>',          # arguments that are not JSON
             'get_wether\n{"city": "北京"}<|observation|>',         # an undeclared tool
             'divide\n{"a": 1, "b": 0}<|observation|>',             # the tool raises
             '\nsorry<|user|>']
    agent, _ = chat(engine, chat_tok, texts, Toolbox([get_weather, divide]))
    events = drain(agent, "x")
    tools = [e for e in agent.transcript.events if e["event"] == "tool"]
    json_error = ("invalid arguments for get_weather: not valid JSON (Expecting value at line 1 column 10); "
                  'send one JSON object such as {"name": value}')
    unknown = "the model called 'get_wether', which is not a declared tool; kept as content"
    assert tools == [
        tool_event(1, "call_1", "get_weather", '{"city": 北京', "error: " + json_error, json_error),
        tool_event(2, "parse_error", None, None, "error: your reply could not be read: " + unknown, "parse error"),
        tool_event(3, "call_2", "divide", '{"a": 1, "b": 0}', "error: divide raised ZeroDivisionError: float division by zero",
                   "divide raised ZeroDivisionError: float division by zero"),
    ]
    assert events[-1].reason == "answer" and events[-1].calls == 2
    # the unreadable call is kept in the history as the text the model wrote; the conversation still renders
    assert agent.messages[1].to_dict() == {"role": "assistant", "content": 'get_weather\n{"city": 北京'}
    assert agent.messages[3].to_dict() == {"role": "assistant", "content": 'get_wether\n{"city": "北京"}'}
    agent.prompt_ids()


def test_call_cap_refuses_the_rest_and_stops(engine, chat_tok):
    one = 'get_weather\n{"city": "%s"}'
    texts = [(one % "a") + "<|observation|>", "<|assistant|>".join(one % c for c in "bcd") + "<|observation|>"]
    agent, _ = chat(engine, chat_tok, texts, Toolbox([get_weather]), max_calls=3)
    events = drain(agent, "x")
    runs = [(r.id, r.error) for r in events if isinstance(r, ToolRun)]
    refused = "not run: the limit of 3 tool calls per message was reached"
    assert runs == [("call_1", None), ("call_2", None), ("call_3", None), ("call_4", refused)]
    assert (events[-1].reason, events[-1].rounds, events[-1].calls) == ("max_calls", 2, 3)
    assert agent.messages[-1].to_dict() == {"role": "tool", "tool_call_id": "call_4", "content": "error: " + refused}
    assert agent.transcript.events[-1] == {"event": "end", "reason": "max_calls", "rounds": 2, "calls": 3}


def test_round_cap_length_and_observation_cap(engine, chat_tok):
    def shout(text: str) -> str:
        """Repeat the text."""
        return text * 50

    texts = ['shout\n{"text": "ab"}<|observation|>'] * 3
    agent, _ = chat(engine, chat_tok, texts, Toolbox([shout]), max_rounds=2, max_observation_chars=10)
    events = drain(agent, "x")
    runs = [r for r in events if isinstance(r, ToolRun)]
    assert [(r.result, r.truncated) for r in runs] == [("ababababab\n[observation cut: 10 of 100 characters shown]", True)] * 2
    assert events[-1].reason == "max_rounds"
    from glmkit.infer.sampling import SamplingConfig
    agent, _ = chat(engine, chat_tok, ['\n' + 'ab' * 40 + '<|user|>'], Toolbox(), sampling=SamplingConfig(max_new_tokens=5))
    events = drain(agent, "x")
    assert events[-1].reason == "length" and agent.transcript.events[-2]["tokens"] == 5


def test_reset_save_and_template_rendering(engine, chat_tok, tmp_path):
    agent, _ = chat(engine, chat_tok, ["\nhi<|user|>"], Toolbox([get_weather]), system="Be brief.")
    drain(agent, "hello")
    saved = json.loads(agent.save(tmp_path / "c.json").read_text())
    assert saved == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "hi"}]
    agent.reset()
    assert [m.to_dict() for m in agent.messages] == [{"role": "system", "content": "Be brief."}]
    assert agent.transcript.events[-1] == {"event": "reset"}
    # glmkit's own Jinja template of a format renders the same ids as its renderer
    for fmt in ("glm4", "glm45"):
        templated = Agent(engine, chat_tok, fmt=ChatFormat(fmt, chat_template(fmt)), tools=Toolbox([get_weather]))
        plain = Agent(engine, chat_tok, fmt=fmt, tools=Toolbox([get_weather]))
        templated.load(saved[:2]), plain.load(saved[:2])
        assert templated.prompt_ids() == plain.prompt_ids()


def test_choose_format_and_checkpoint_template(chat_tok, glm4_tok, tmp_path):
    assert choose_format("auto", chat_tok) == ChatFormat("glm45")           # has GLM-4.5's structural tokens
    assert choose_format("auto", glm4_tok) == ChatFormat("glm4")
    assert choose_format("glm4", chat_tok) == ChatFormat("glm4")
    t45 = chat_template("glm45")
    assert choose_format("auto", chat_tok, template=t45) == ChatFormat("glm45", t45)
    assert choose_format("auto", chat_tok, template="{{ metadata }}") == ChatFormat("glm4")  # GLM-4-9B-chat's
    t4 = chat_template("glm4")
    assert choose_format("auto", chat_tok, template=t4) == ChatFormat("glm4", t4)
    with pytest.raises(GlmkitError, match="glm4, glm45 or auto"):
        choose_format("chatml", chat_tok)
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T1"}))
    assert read_chat_template(tmp_path) == "T1"
    (tmp_path / "chat_template.jinja").write_text("T2")
    assert read_chat_template(tmp_path) == "T2"


def test_cap_observation():
    assert cap_observation("abc", 3) == ("abc", False)
    assert cap_observation("abcd", 3) == ("abc\n[observation cut: 3 of 4 characters shown]", True)
