"""`glmkit serve` and tools beyond the shared server: the tool_choice constraints themselves, the
GLM-4.5 format (reasoning, tool calls, thinking off), a checkpoint's own chat template, and tools that
run on the server (`--tools`: a fake sandbox, and the real one where the machine can build it). Each
test that needs a server starts its own with the settings it tests (`serve_helpers.serving`).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from serve_helpers import MODEL, TIME, USER, WEATHER, Script, serving  # noqa: E402

from glmkit.chat.render import render  # noqa: E402
from glmkit.serve.chat import plan_chat  # noqa: E402
from glmkit.serve.protocol import ChatCompletionRequest  # noqa: E402


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


def test_glm45_reasoning_and_calls(chat_model, chat_tok):
    tok = chat_tok
    sp = tok.special_id
    reply = ([sp("<think>")] + tok.encode("Need the weather.") + [sp("</think>")] + tok.encode("\n")
             + [sp("<tool_call>")] + tok.encode("get_weather\n") + [sp("<arg_key>")] + tok.encode("city")
             + [sp("</arg_key>")] + tok.encode("\n") + [sp("<arg_value>")] + tok.encode("北京") + [sp("</arg_value>")]
             + tok.encode("\n") + [sp("</tool_call>"), sp("<|observation|>")])
    script = Script(tok)
    script.add("Weather in", reply)
    with serving(chat_model, tok, fmt="glm45", processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0)
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0,
                                                stream=True))
    msg = r.choices[0].message
    assert msg.reasoning_content == "Need the weather."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "北京"}
    assert r.choices[0].finish_reason == "tool_calls"
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == "Need the weather."


def test_glm45_thinking_off(chat_model, chat_tok):
    script = Script(chat_tok)
    with serving(chat_model, chat_tok, fmt="glm45", processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0)
    assert script.prompts[0] == render(USER, None, "glm45", tokenizer=chat_tok, enable_thinking=False).ids
    assert script.prompts[1] == render(USER, None, "glm45", tokenizer=chat_tok).ids
    assert script.prompts[0] != script.prompts[1]


def test_a_checkpoints_own_template_renders_the_prompt(chat_model, chat_tok):
    """With a chat template (here glmkit's glm45 one, which renders what the renderer does) the prompt is
    the template's; a named call is opened after its generation prompt as the renderer opens it."""
    from glmkit.chat import chat_template
    from glmkit.chat.template import render_template
    script = Script(chat_tok)
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    with serving(chat_model, chat_tok, fmt="glm45", template=chat_template("glm45"),
                 processor_hook=script) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=2, temperature=0)
        r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert script.prompts[0] == render_template(chat_template("glm45"), messages, [WEATHER], tokenizer=chat_tok).ids
    assert script.prompts[0] == render(messages, [WEATHER], "glm45", tokenizer=chat_tok).ids
    assert script.prompts[1] == render(messages, [WEATHER], "glm45", tokenizer=chat_tok, forced_tool="get_weather").ids
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


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


def test_server_side_python_runs_on_the_server(chat_model, chat_tok, tmp_path):
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
    with serving(chat_model, tok, processor_hook=hook, tools=tools) as (_, url):
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


def test_server_tools_return_the_clients_calls(chat_model, chat_tok, tmp_path):
    from glmkit.chat.agent import Toolbox
    from glmkit.serve.tools import ServerTools
    tok = chat_tok
    tools = ServerTools(lambda folder: Toolbox(sandbox=FakeSandbox(folder)), tmp_path, "glm4")
    obs = tok.special_id("<|observation|>")
    hook = TwoRounds(tok, tok.encode('get_weather\n{"city": "北京"}') + [obs], [obs])
    with serving(chat_model, tok, processor_hook=hook, tools=tools) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, r.choices[0].finish_reason) == (
        "get_weather", '{"city": "北京"}', "tool_calls")
    assert hook.prompts[0] == render(USER, [{"type": "python"}, WEATHER], "glm4", tokenizer=tok).ids


@pytest.mark.slow
def test_server_side_python_in_the_real_sandbox(chat_model, chat_tok, tmp_path):
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
    with serving(chat_model, tok, processor_hook=hook, tools=tools) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "6*7?"}], temperature=0,
                                      extra_headers={"X-Conversation-Id": "t1"})
    tools.close()
    shutil.rmtree(short, ignore_errors=True)
    assert r.choices[0].message.content == "Done."
    assert "42" in tok.decode(hook.prompts[1][len(hook.prompts[0]):])      # the kernel's output, read by the model
