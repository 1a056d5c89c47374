"""Helpers shared by several test modules."""

import json


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
}


def openai_with_parsed_arguments(messages: list) -> list:
    """OpenAI message dicts with tool call arguments as mappings (what HF chat templates take)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out
