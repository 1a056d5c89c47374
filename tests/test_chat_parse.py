"""Chat parsers: every rendered assistant turn, fed one token at a time, streams back exactly the
message (OpenAI streaming semantics); render -> parse round trips of arbitrary conversations
(hypothesis); malformed model output becomes content or a reported error, never an exception."""

import json

import pytest
from helpers import CONVERSATIONS, GLM4_TOOLS, TOOL, WEATHER, conversations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit.chat import AssistantMessage, make_parser, messages_from_dicts, parse, render
from glmkit.chat.glm4 import call_text
from glmkit.chat.glm45 import split_reasoning


def assemble(deltas, whole_characters: bool = True) -> tuple:
    """(content, reasoning, [(name, arguments)]) from OpenAI-shaped deltas, checking the streaming
    rules: a call's id, type and name only in its first delta, calls in index order."""
    content, reasoning, calls = [], [], []
    for d in deltas:
        delta = d.to_dict()
        assert len(delta) == 1
        if "tool_calls" in delta:
            (tc,) = delta["tool_calls"]
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["name"]
                assert tc["function"]["arguments"] == ""
                calls.append([tc["function"]["name"], ""])
            else:
                assert tc["index"] == len(calls) - 1 and set(tc) == {"index", "function"}
                assert set(tc["function"]) == {"arguments"} and tc["function"]["arguments"]
                calls[-1][1] += tc["function"]["arguments"]
        elif "reasoning_content" in delta:
            reasoning.append(delta["reasoning_content"])
        else:
            content.append(delta["content"])
        if whole_characters:  # no character split across deltas
            assert "\ufffd" not in json.dumps(delta, ensure_ascii=False)
    return "".join(content) or None, "".join(reasoning) or None, [tuple(c) for c in calls]


def expected(msg: AssistantMessage, fmt: str, after_last_user: bool) -> tuple:
    """What the format keeps of an assistant message."""
    calls = [(c.function.name, json.dumps(c.function.parsed_arguments(), ensure_ascii=False))
             for c in msg.tool_calls]
    if fmt == "glm4":  # a built-in tool's empty text is not rendered
        calls = [(n, a) for n, a in calls if call_text(n, json.loads(a))]
        return msg.text or None, None, calls
    reasoning, content = split_reasoning(msg)
    return content.strip() or None, (reasoning.strip() or None) if after_last_user else None, calls


def check_turns(messages, tools, fmt, tok):
    """Render the conversation; stream every assistant turn back through the parser."""
    messages = messages_from_dicts(messages)
    r = render(messages, tools, fmt, tokenizer=tok, add_generation_prompt=False)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for i, msg in enumerate(messages):
        if msg.role != "assistant":
            continue
        start, end = r.spans[i]
        ids = r.ids[start + 1:end]  # what the model wrote after its <|assistant|>
        parser = make_parser(fmt, tok, tools, make_id=lambda k: f"call_{k}")
        deltas = [d for token in ids for d in parser.feed(token)] + parser.finish("stop")
        want = expected(msg, fmt, i > last_user)
        assert assemble(deltas) == want, (fmt, i)
        got = parser.message()
        assert (got.content, got.reasoning_content, [(c.function.name, c.function.arguments)
                                                     for c in got.tool_calls]) == want
        assert got.parse_errors == [] and [c.id for c in got.tool_calls] == [f"call_{k}" for k in range(len(want[2]))]
        assert parser.finish_reason == ("tool_calls" if want[2] else "stop")
        assert parse(ids, fmt, tok, tools, make_id=lambda k: f"call_{k}") == got


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_every_rendered_turn_streams_back(name, chat_tok):
    messages, tools, formats = CONVERSATIONS[name]
    for fmt in formats:
        check_turns(messages, tools, fmt, chat_tok)


# ---------------------------------------------------------------------------- round trip (hypothesis)
@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_render_parse_round_trip(fmt, chat_tok):
    tools = GLM4_TOOLS if fmt == "glm4" else [TOOL]

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations(fmt))
    def run(messages):
        check_turns(messages, tools, fmt, chat_tok)

    run()


# ---------------------------------------------------------------------------- model output, well and badly formed
def run_parser(fmt, tok, text, tools=(WEATHER,), reason="stop", **kw):
    """Feed `text` (structural tokens spelled out) one id at a time; (deltas, message, finish reason)."""
    parser = make_parser(fmt, tok, list(tools), make_id=lambda k: f"call_{k}", **kw)
    deltas = [d for i in tok.encode(text, allow_special=True) for d in parser.feed(i)] + parser.finish(reason)
    return deltas, parser.message(), parser.finish_reason


def test_glm4_output(chat_tok):
    deltas, msg, finish = run_parser("glm4", chat_tok, '\n好的。<|assistant|>get_weather\n{"city": "北京"}'
                                     '<|assistant|>get_weather\n{"city": "上海"}<|observation|>ignored')
    assert assemble(deltas) == ("好的。", None, [("get_weather", '{"city": "北京"}'), ("get_weather", '{"city": "上海"}')])
    assert finish == "tool_calls" and msg.parse_errors == []
    # text without a metadata line streams at once, as soon as it cannot be a tool name
    parser = make_parser("glm4", chat_tok, [WEATHER])
    first = [d for i in chat_tok.encode("Hello there") for d in parser.feed(i)]
    assert "".join(d.content for d in first) == "Hello there"


def test_glm4_python_code_streams_as_json(chat_tok):
    deltas, msg, finish = run_parser("glm4", chat_tok, 'python\nprint("北京")\nx = 1', tools=[{"type": "python"}])
    assert assemble(deltas) == (None, None, [("python", '{"code": "print(\\"北京\\")\\nx = 1"}')])
    assert msg.tool_calls[0].function.parsed_arguments() == {"code": 'print("北京")\nx = 1'} and finish == "tool_calls"


def test_glm4_browser_command_streams_as_json(chat_tok):
    deltas, msg, finish = run_parser("glm4", chat_tok, 'simple_browser\nsearch("北京天气")',
                                     tools=[{"type": "simple_browser"}, WEATHER])
    assert assemble(deltas) == (None, None, [("simple_browser", '{"command": "search(\\"北京天气\\")"}')])
    assert msg.tool_calls[0].function.parsed_arguments() == {"command": 'search("北京天气")'} and finish == "tool_calls"
    # undeclared, the built-in's call is text
    deltas, msg, finish = run_parser("glm4", chat_tok, 'simple_browser\nsearch("x")')
    assert assemble(deltas) == ('simple_browser\nsearch("x")', None, []) and finish == "stop"


def test_glm4_forced_call(chat_tok):
    deltas, msg, finish = run_parser("glm4", chat_tok, '{"city": "北京"}', forced_tool="get_weather")
    assert assemble(deltas) == (None, None, [("get_weather", '{"city": "北京"}')]) and finish == "tool_calls"


@pytest.mark.parametrize("text, reason, want, finish, error", [
    ('nope\n{"a": 1}', "stop", ('nope\n{"a": 1}', None, []), "stop", "'nope', which is not a declared tool"),
    ('get_weather\n{"city": ', "stop", (None, None, [("get_weather", '{"city": ')]), "tool_calls",
     "arguments are not a JSON object"),
    ('get_weather\n{"ci', "length", (None, None, [("get_weather", '{"ci')]), "length", "was cut off"),
    ("get_weather", "stop", ("get_weather", None, []), "stop", None),
    ("Hi [MASK] <sop>", "stop", ("Hi [MASK] <sop>", None, []), "stop", None),
])
def test_glm4_malformed_output(chat_tok, text, reason, want, finish, error):
    # [MASK] and <sop> spelled here become their special ids: a model can emit them; they read as text
    deltas, msg, got_finish = run_parser("glm4", chat_tok, text, reason=reason)
    assert assemble(deltas) == want and got_finish == finish
    assert (error is None and msg.parse_errors == []) or (len(msg.parse_errors) == 1 and error in msg.parse_errors[0])


def test_glm45_output(chat_tok):
    deltas, msg, finish = run_parser(
        "glm45", chat_tok, "\n<think>先查天气。\n</think>\n我来查。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
        "<tool_call>get_weather\n</tool_call><|observation|>")
    assert assemble(deltas) == ("我来查。", "先查天气。", [("get_weather", '{"city": "北京", "days": 3}'),
                                                       ("get_weather", "{}")])
    assert finish == "tool_calls" and msg.parse_errors == []
    # the reasoning streams before the call, the name before the arguments
    kinds = [("r" if d.reasoning_content else "c" if d.content else "t") for d in deltas]
    assert kinds.index("c") > max(i for i, k in enumerate(kinds) if k == "r")


def test_glm45_forced_call_and_thinking_off(chat_tok):
    deltas, _, finish = run_parser("glm45", chat_tok, "<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>",
                                   forced_tool="get_weather")
    assert assemble(deltas) == (None, None, [("get_weather", '{"city": "北京"}')]) and finish == "tool_calls"
    # after a prompt ending in <think></think> the model writes content directly
    deltas, _, finish = run_parser("glm45", chat_tok, "\n直接回答。")
    assert assemble(deltas) == ("直接回答。", None, []) and finish == "stop"


@pytest.mark.parametrize("text, reason, want, finish, error", [
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北", "stop",
     (None, None, [("get_weather", '{"city": "北')]), "stop", "was cut off"),
    ("ok\n<tool_call>nope\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", "stop",
     ("ok\n<tool_call>nope\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", None, []), "stop",
     "'nope', which is not a declared tool"),
    ('<tool_call>{"name": "get_weather"}</tool_call>', "stop", ('<tool_call>{"name": "get_weather"}</tool_call>', None, []),
     "stop", "not a declared tool"),
    ("<tool_call>get_weather\nstray<arg_key>city</arg_key>\n<arg_value>x</arg_value>\n</tool_call>", "stop",
     (None, None, [("get_weather", '{"city": "x"}')]), "tool_calls", "text between arguments ignored"),
    ("<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>three</arg_value>\n</tool_call>", "stop",
     (None, None, [("get_weather", '{"days": "three"}')]), "tool_calls", None),
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>x</tool_call>", "stop",
     (None, None, [("get_weather", '{"city": "x"}')]), "tool_calls", "an <arg_value> was not closed"),
    ("<tool_call>get_weather\n<arg_key>city<arg_value>x</arg_value></tool_call>", "stop",
     (None, None, [("get_weather", '{"city": "x"}')]), "tool_calls", "an <arg_key> was not closed"),
    ("<tool_call>get_weather\n<arg_value>x</arg_value></tool_call>", "stop",
     (None, None, [("get_weather", "{}")]), "tool_calls", "without an <arg_key>"),
    ("<think>long thoughts", "length", (None, "long thoughts", []), "length", None),
    ("<tool_call>get_wea", "length", ("<tool_call>get_wea", None, []), "length", "cut off before its name ended"),
    ("a</think>b<think>c", "stop", ("a</think>b<think>c", None, []), "stop", None),
])
def test_glm45_malformed_output(chat_tok, text, reason, want, finish, error):
    deltas, msg, got_finish = run_parser("glm45", chat_tok, text, reason=reason)
    assert assemble(deltas) == want and got_finish == finish
    assert (error is None and msg.parse_errors == []) or (len(msg.parse_errors) == 1 and error in msg.parse_errors[0])


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_text_deltas_never_split_a_character(fmt, chat_tok):
    text = "😀👍🏽龘𠀀é"  # byte tokens in this tiny vocabulary: each character spans several ids
    ids = chat_tok.encode("\n" + text)
    assert len(ids) > len(text) + 1
    parser = make_parser(fmt, chat_tok, [WEATHER])
    pieces = [d.content for i in ids for d in parser.feed(i)] + [d.content for d in parser.finish("stop")]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    # bytes of a character cut off by the token budget come out as U+FFFD at the end, not an error
    parser = make_parser(fmt, chat_tok, [WEATHER])
    parser.feed_all(ids[:3])
    parser.finish("length")
    assert parser.message().content.endswith("\ufffd") and parser.finish_reason == "length"


def test_feeding_after_a_stop_does_nothing(chat_tok):
    parser = make_parser("glm45", chat_tok, [WEATHER])
    parser.feed_all(chat_tok.encode("\nHi<|user|>more text", allow_special=True))
    assert parser.finish("stop") == [] and parser.message().content == "Hi" and parser.stopped


@pytest.mark.parametrize("fmt", ["glm4", "glm45"])
def test_any_output_parses_without_raising(fmt, chat_tok):
    """Random ids, structural ones frequent: no exception, the deltas always add up to the message."""
    pieces = [[i] for i in sorted(chat_tok.special_ids)] + [
        chat_tok.encode(t, allow_special=True) for t in (
            "get_weather\n", "\n", "city", "days", '{"city": "北京"}', "3", "python\n", "x",
            "<tool_call>get_weather\n", "<arg_key>city</arg_key>", "<|assistant|>get_weather\n")]
    piece = st.one_of(st.sampled_from(pieces), st.integers(0, chat_tok.vocab_size - 1).map(lambda i: [i]))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(piece, max_size=30).map(lambda ps: [i for p in ps for i in p]),
           st.sampled_from(["stop", "length"]), st.sampled_from([None, "get_weather"]))
    def run(ids, reason, forced):
        parser = make_parser(fmt, chat_tok, [WEATHER], forced_tool=forced, make_id=lambda k: f"call_{k}")
        deltas = [d for i in ids for d in parser.feed(i)] + parser.finish(reason)
        msg = parser.message()
        assert assemble(deltas, whole_characters=False) == (
            msg.content, msg.reasoning_content, [(c.function.name, c.function.arguments) for c in msg.tool_calls])
        assert parser.finish_reason in ({"length"} if reason == "length" else {"stop", "tool_calls"})
        cut_off = sum(e.startswith("tool call") and "cut off" in e for e in msg.parse_errors)
        assert (parser.finish_reason == "tool_calls") == (reason == "stop" and len(msg.tool_calls) > cut_off)

    run()
