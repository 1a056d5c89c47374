"""Helpers shared by several test modules."""

import json

from hypothesis import strategies as st

from glmkit.data.tokenizer import GLM45_TOKENS


# ---------------------------------------------------------------------------- chat conversations
def call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object"},
                                                    "exact": {"type": "boolean"}}}}}

# name -> (messages, tools, formats it applies to)
CONVERSATIONS = {
    "plain": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!\nHow can I help?"},
               {"role": "user", "content": "你好，北京天气怎么样？"}], None, ("glm4", "glm45")),
    "call": ([{"role": "user", "content": "Weather in Beijing?"},
              {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", {"city": "北京"})]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}], [WEATHER], ("glm4", "glm45")),
    "parallel": ([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "北京和上海的天气？"},
                  {"role": "assistant", "content": "我来查一下。", "tool_calls": [
                      call(1, "get_weather", {"city": "北京"}), call(2, "get_weather", {"city": "上海", "days": 2})]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "晴，3°C"},
                  {"role": "tool", "tool_call_id": "call_2", "content": "雨，9°C"},
                  {"role": "assistant", "content": "北京晴，上海有雨。", "reasoning_content": "Both answered."}],
                 [WEATHER], ("glm4", "glm45")),
    "thinking": ([{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
                  {"role": "user", "content": "Search for it"},
                  {"role": "assistant", "content": "<think>\nLet me search.\n</think>\n\nSearching.  ",
                   "tool_calls": [call(3, "search", {"q": "2+2", "opts": {"n": [1, 2.5, True, None]},
                                                     "exact": False})]},
                  {"role": "tool", "tool_call_id": "call_3", "content": "4"},
                  {"role": "assistant", "content": "It is 4.", "reasoning_content": "  The search agrees.\n"}],
                 [WEATHER, SEARCH], ("glm4", "glm45")),
    "python": ([{"role": "user", "content": "π?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [call(1, "python", {"code": "import math\nprint(math.pi)"})]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3.141592653589793"},
                {"role": "assistant", "content": "π ≈ 3.14159"}],
               [{"type": "python"}, WEATHER], ("glm4",)),
    "browser": ([{"role": "user", "content": "北京天气"},
                 {"role": "assistant", "content": None,
                  "tool_calls": [call(1, "simple_browser", {"command": 'search("北京天气")'})]},
                 {"role": "tool", "tool_call_id": "call_1", "content": " # 【0†北京天气†weather.cn】\n晴，3°C"},
                 {"role": "assistant", "content": "北京今天晴【0†weather.cn】。"}],
                [{"type": "simple_browser"}], ("glm4",)),
}


def openai_with_parsed_arguments(messages: list) -> list:
    """OpenAI message dicts with tool call arguments as mappings (what HF chat templates take)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


# ---------------------------------------------------------------------------- random conversations
SPELLINGS = ["<|assistant|>", "<|user|>", "<|observation|>", "<|system|>", "[gMASK]", "<sop>", "<|endoftext|>",
             *GLM45_TOKENS]
PIECES = ["a", "b", "Z", " ", "  ", "\n", "\t", "北", "京", "天气", "😀", "é", "{", "}", '"', "\\", ":", ",", "<", "/"]
TEXT = st.lists(st.sampled_from(PIECES + SPELLINGS), max_size=10).map("".join)
TOOL = {"type": "function", "function": {"name": "f", "description": "A test tool.", "parameters": {
    "type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}, "o": {"type": "object"},
                                     "b": {"type": "boolean"}, "a": {"type": "array"}}}}}
GLM4_TOOLS = [TOOL, {"type": "python"}, {"type": "simple_browser"}]
VALUES = {"s": TEXT, "n": st.integers(-10**6, 10**6), "b": st.booleans(),
          "o": st.dictionaries(st.sampled_from(["x", "键", "y z"]), st.one_of(TEXT, st.integers(), st.none()), max_size=3),
          "a": st.lists(st.one_of(st.integers(), TEXT, st.floats(allow_nan=False, allow_infinity=False)), max_size=3)}


@st.composite
def arguments(draw):
    keys = draw(st.permutations(list(VALUES)))[:draw(st.integers(0, len(VALUES)))]
    return {k: draw(VALUES[k]) for k in keys}


@st.composite
def conversations(draw, fmt: str, think_close: bool = False):
    """OpenAI message dicts: users, assistants with text, reasoning and calls of `TOOL` (and of
    glm4's built-in `python` and `simple_browser`), the calls' results. `think_close`: let glm45 assistant text hold </think>."""
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    n_calls = 0
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        for _ in range(draw(st.integers(0, 2))):
            content = draw(TEXT)
            if fmt == "glm45" and not think_close:
                content = content.replace("</think>", "")  # the template reads it as the end of reasoning
            msg = {"role": "assistant", "content": draw(st.sampled_from([content, None]))}
            if draw(st.booleans()):
                msg["reasoning_content"] = draw(TEXT)
            calls = []
            for _ in range(draw(st.integers(0, 2))):
                if fmt == "glm4" and draw(st.booleans()):  # a built-in tool's raw text
                    name, key = draw(st.sampled_from([("python", "code"), ("simple_browser", "command")]))
                    calls.append((name, {key: draw(TEXT)}))
                else:
                    calls.append(("f", draw(arguments())))
            msg["tool_calls"] = [{"id": f"c{n_calls + k}", "type": "function", "function": {
                "name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for k, (name, args) in enumerate(calls)]
            messages.append(msg)
            for k in range(len(calls)):
                messages.append({"role": "tool", "tool_call_id": f"c{n_calls + k}", "content": draw(TEXT)})
            n_calls += len(calls)
    return messages
