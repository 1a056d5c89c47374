"""The one message model: OpenAI chat-completions messages and tools as plain dataclasses.

    system     {"role": "system", "content": str | [text parts]}
    user       {"role": "user", "content": str | [text parts]}
    assistant  {"role": "assistant", "content": str | [text parts] | null,
                "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON str}}],
                "reasoning_content": str}          (reasoning_content: GLM-4.5 / DeepSeek style)
    tool       {"role": "tool", "tool_call_id": str, "content": str | [text parts]}
    tools      [{"type": "function", "function": {"name", "description", "parameters": JSON Schema}}]
               GLM-4's built-in tools are declared as {"type": "python"}, {"type": "simple_browser"},
               {"type": "cogview"} (the `glm4` format describes them in its own words).

`from_dict` validates and raises `MessageError` (a `GlmkitError`) whose `param` names the bad field
the OpenAI way (`messages[2].tool_calls[0].function.arguments`), so a server can answer HTTP 400 with
it; `to_dict` gives the OpenAI JSON shape back. Text parts are `{"type": "text", "text": ...}`; any
other part (images, audio) is refused. Keys the model does not use (`refusal`, `annotations`, ...)
are ignored. Tool call arguments must be a JSON object: every format renders them from the parsed
object, and the `glm45` format needs the keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from glmkit.errors import GlmkitError

# OpenAI's rule for function names; the formats put names in plain text, so they must stay simple.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
BUILTIN_TOOLS = ("python", "simple_browser", "cogview")  # GLM-4's All Tools, declared by type alone


class MessageError(GlmkitError):
    """A bad message or tool; `param` is the field's path (`messages[1].content`)."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


@dataclass
class TextPart:
    text: str
    type: str = "text"


Content = str | list[TextPart] | None


def text_of(content: Content) -> str:
    """The text of a content: the string, the text parts joined, or "" for None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _content_from(value: Any, where: str, allow_none: bool) -> Content:
    if value is None:
        if allow_none:
            return None
        raise MessageError(where, "is required (a string or a list of text parts)")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise MessageError(where, f"must be a string or a list of text parts, got {type(value).__name__}")
    parts = []
    for i, part in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise MessageError(here, f"only text parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise MessageError(f"{here}.text", "must be a string")
        parts.append(TextPart(part["text"]))
    return parts


def _content_to(content: Content) -> Any:
    if content is None or isinstance(content, str):
        return content
    return [{"type": p.type, "text": p.text} for p in content]


def _string(d: dict, key: str, where: str, required: bool = True) -> str | None:
    value = d.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise MessageError(f"{where}.{key}", f"must be a string, got {got}")
    return value


def _check_name(name: str, where: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise MessageError(where, f"{name!r} is not a valid function name: use 1-64 letters, digits, _ or -")
    return name


@dataclass
class _TextMessage:
    """A message that is only text and an optional speaker name (system, user)."""
    content: Content
    name: str | None = None
    role = ""

    @property
    def text(self) -> str:
        return text_of(self.content)

    def to_dict(self) -> dict:
        return _with_name({"role": self.role, "content": _content_to(self.content)}, self.name)


@dataclass
class SystemMessage(_TextMessage):
    role = "system"


@dataclass
class UserMessage(_TextMessage):
    role = "user"


@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object, as text

    def parsed_arguments(self) -> dict:
        """The arguments as a dict (they were checked to be a JSON object when validated)."""
        return json.loads(self.arguments)


@dataclass
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


@dataclass
class AssistantMessage:
    content: Content = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_content: str | None = None
    name: str | None = None
    # what a parser could not make sense of in the model's output (never serialised)
    parse_errors: list[str] = field(default_factory=list, compare=False)
    role = "assistant"

    @property
    def text(self) -> str:
        return text_of(self.content)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"role": self.role, "content": _content_to(self.content)}
        if self.tool_calls:
            d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.reasoning_content is not None:
            d["reasoning_content"] = self.reasoning_content
        return _with_name(d, self.name)


@dataclass
class ToolMessage:
    content: Content
    tool_call_id: str
    role = "tool"

    @property
    def text(self) -> str:
        return text_of(self.content)

    def to_dict(self) -> dict:
        return {"role": self.role, "tool_call_id": self.tool_call_id, "content": _content_to(self.content)}


Message = SystemMessage | UserMessage | AssistantMessage | ToolMessage
ROLES = ("system", "user", "assistant", "tool")


def _with_name(d: dict, name: str | None) -> dict:
    if name is not None:
        d["name"] = name
    return d


def message_from_dict(d: Any, where: str = "message") -> Message:
    """One OpenAI message dict -> a message; `where` prefixes the field path in errors."""
    if isinstance(d, (SystemMessage, UserMessage, AssistantMessage, ToolMessage)):
        return d
    if not isinstance(d, dict):
        raise MessageError(where, f"must be an object with a 'role', got {type(d).__name__}")
    role = d.get("role")
    if role not in ROLES:
        raise MessageError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    name = _string(d, "name", where, required=False)
    if role == "system":
        return SystemMessage(_content_from(d.get("content"), f"{where}.content", False), name)
    if role == "user":
        return UserMessage(_content_from(d.get("content"), f"{where}.content", False), name)
    if role == "tool":
        return ToolMessage(_content_from(d.get("content"), f"{where}.content", False),
                           _string(d, "tool_call_id", where))
    calls = d.get("tool_calls") or []
    if not isinstance(calls, list):
        raise MessageError(f"{where}.tool_calls", f"must be a list, got {type(calls).__name__}")
    return AssistantMessage(
        content=_content_from(d.get("content"), f"{where}.content", True),
        tool_calls=[_tool_call_from(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)],
        reasoning_content=_string(d, "reasoning_content", where, required=False),
        name=name)


def _tool_call_from(d: Any, where: str) -> ToolCall:
    if not isinstance(d, dict):
        raise MessageError(where, f"must be an object, got {type(d).__name__}")
    if d.get("type", "function") != "function":
        raise MessageError(f"{where}.type", f"must be 'function', got {d.get('type')!r}")
    fn = d.get("function")
    if not isinstance(fn, dict):
        raise MessageError(f"{where}.function", "must be an object with 'name' and 'arguments'")
    name = _check_name(_string(fn, "name", f"{where}.function"), f"{where}.function.name")
    arguments = _string(fn, "arguments", f"{where}.function")
    check_arguments(arguments, f"{where}.function.arguments")
    return ToolCall(_string(d, "id", where), FunctionCall(name, arguments))


def check_arguments(arguments: str, where: str) -> dict:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise MessageError(where, f"is not valid JSON ({e}): {arguments[:80]!r}") from None
    if not isinstance(value, dict):
        raise MessageError(where, f"must be a JSON object, got {type(value).__name__}: {arguments[:80]!r}")
    return value


def messages_from_dicts(items: Any, where: str = "messages") -> list[Message]:
    if not isinstance(items, list):
        raise MessageError(where, f"must be a list of messages, got {type(items).__name__}")
    return [message_from_dict(m, f"{where}[{i}]") for i, m in enumerate(items)]


@dataclass
class ToolSpec:
    """The declaration of a tool (what a format shows the model): an OpenAI function tool, or one of
    GLM-4's built-in tools (`type` python / simple_browser / cogview, no function). The callable
    tools of `glmkit.chat.functions` are accepted wherever a declaration is (through their `spec()`)."""
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None
    type: str = "function"

    def function_dict(self) -> dict:
        """The `function` object, keys in OpenAI's order: name, description, parameters, strict."""
        d: dict[str, Any] = {"name": self.name}
        for key in ("description", "parameters", "strict"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def to_dict(self) -> dict:
        if self.type != "function":
            return {"type": self.type}
        return {"type": "function", "function": self.function_dict()}

    def property_schema(self, key: str) -> dict | None:
        """The JSON Schema of one argument, when declared."""
        props = (self.parameters or {}).get("properties")
        schema = props.get(key) if isinstance(props, dict) else None
        return schema if isinstance(schema, dict) else None

    @classmethod
    def from_dict(cls, d: Any, where: str = "tool") -> ToolSpec:
        if isinstance(d, ToolSpec):
            return d
        if callable(getattr(d, "spec", None)):  # a callable tool of glmkit.chat.functions
            d = d.spec()
        if not isinstance(d, dict):
            raise MessageError(where, f"must be an object, got {type(d).__name__}")
        kind = d.get("type")
        if kind in BUILTIN_TOOLS:
            return cls(type=kind)
        if kind != "function":
            raise MessageError(f"{where}.type", f"must be 'function' (or a GLM-4 built-in: "
                               f"{', '.join(BUILTIN_TOOLS)}), got {kind!r}")
        fn = d.get("function")
        if not isinstance(fn, dict):
            raise MessageError(f"{where}.function", "must be an object with at least a 'name'")
        here = f"{where}.function"
        name = _check_name(_string(fn, "name", here), f"{here}.name")
        description = _string(fn, "description", here, required=False)
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise MessageError(f"{here}.parameters", f"must be a JSON Schema object, got {type(parameters).__name__}")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise MessageError(f"{here}.strict", f"must be true or false, got {strict!r}")
        return cls(name=name, description=description, parameters=parameters, strict=strict)


def tools_from_dicts(items: Any, where: str = "tools") -> list[ToolSpec]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise MessageError(where, f"must be a list of tools, got {type(items).__name__}")
    tools = [ToolSpec.from_dict(t, f"{where}[{i}]") for i, t in enumerate(items)]
    seen: set[str] = set()
    for i, t in enumerate(tools):
        key = t.name if t.type == "function" else t.type
        if key in seen:
            raise MessageError(f"{where}[{i}]", f"the tool {key!r} is declared twice")
        seen.add(key)
    return tools
