"""Conversations to token ids or text in a GLM chat format, and model output back to messages.

    render(messages, tools, fmt, tokenizer=tok)  -> Rendered(ids, labels, spans)
    render_text(messages, tools, fmt)            -> str (what the published chat template renders)
    make_parser(fmt, tok, tools)                 -> an incremental parser: feed(id) -> deltas
    parse(ids, fmt, tok, tools)                  -> AssistantMessage
    stop_ids(fmt, tok)                           -> ids that end a generated turn
    chat_template(fmt)                           -> glmkit's Jinja template of the format

Formats: `glm4` (GLM-4-9B-chat; see `glmkit.chat.glm4`) and `glm45` (GLM-4.5 / 4.6; see
`glmkit.chat.glm45`). `messages` and `tools` are message / `ToolSpec` objects or OpenAI dicts (validated;
a bad field raises `MessageError` naming it). Options:
- add_generation_prompt: end with the opening of the assistant's turn, ready to generate;
- enable_thinking (glm45): False appends `/nothink` to user turns and opens the reply with an empty
  `<think></think>`, as the published template does;
- forced_tool: a declared tool's name; the prompt then ends inside a call of it (`<|assistant|>name\\n`
  for glm4, `...<tool_call>name\\n` after an empty `<think></think>` for glm45), which is how
  `tool_choice` naming a function is honoured; give the same name to `make_parser`;
- close_last_turn (training, without a generation prompt): append the `<|user|>` that ends the
  final assistant turn, as GLM-4's fine-tuning code does, so the model learns to stop.
"""

from __future__ import annotations

from pathlib import Path

from glmkit.chat import glm4, glm45
from glmkit.chat.messages import (
    AssistantMessage,
    Message,
    MessageError,
    ToolSpec,
    check_arguments,
    messages_from_dicts,
    tools_from_dicts,
)
from glmkit.chat.pieces import Rendered, join, tokenize
from glmkit.chat.stream import ParserBase, new_call_id
from glmkit.errors import GlmkitError

FORMATS = ("glm4", "glm45")
TEMPLATES = Path(__file__).parent / "templates"


def _format(fmt: str):
    if fmt == "glm4":
        return glm4
    if fmt == "glm45":
        return glm45
    raise GlmkitError(f"unknown chat format {fmt!r}; use one of {', '.join(FORMATS)} "
                      "(glm4: GLM-4-9B-chat and glmkit models; glm45: GLM-4.5 / 4.6)")


def _check_tokenizer(fmt: str, tokenizer) -> None:
    missing = [t for t in _format(fmt).STRUCTURE + _format(fmt).STOPS if tokenizer.special_id(t) is None]
    if missing:
        hint = (" GLM-4-9B's tokenizer lacks GLM-4.5's structural tokens: use fmt='glm4' with it, or a "
                "tokenizer from GLM-4.5 or `glmkit tokenizer train` (which adds them)") if fmt == "glm45" else ""
        raise GlmkitError(f"the {fmt} chat format needs the special token(s) {' '.join(missing)}, which this "
                          f"tokenizer lacks.{hint}")


def validated(messages, tools, forced_tool: str | None = None) -> tuple[list[Message], list[ToolSpec]]:
    """Messages and tools as objects, checked (tool call arguments are JSON objects; a forced tool is
    declared); a bad field raises `MessageError` naming it."""
    messages = messages_from_dicts(list(messages) if isinstance(messages, tuple) else messages)
    tools = tools_from_dicts(list(tools) if isinstance(tools, tuple) else tools)
    for m, msg in enumerate(messages):
        if isinstance(msg, AssistantMessage):
            for c, call in enumerate(msg.tool_calls):
                check_arguments(call.function.arguments, f"messages[{m}].tool_calls[{c}].function.arguments")
    if forced_tool is not None:
        names = {t.name if t.type == "function" else t.type for t in tools}
        if forced_tool not in names:
            raise MessageError("tool_choice", f"names {forced_tool!r}, which is not among the declared tools "
                               f"({', '.join(sorted(names)) or 'none'})")
    return messages, tools


def _pieces(messages, tools, fmt, add_generation_prompt, enable_thinking, forced_tool, close_last_turn):
    _format(fmt)
    messages, tools = validated(messages, tools, forced_tool)
    if forced_tool is not None and not add_generation_prompt:
        raise GlmkitError("forced_tool needs add_generation_prompt=True (it is part of the generation prompt)")
    close = close_last_turn and bool(messages) and isinstance(messages[-1], AssistantMessage)
    if fmt == "glm4":
        out = glm4.pieces(messages, tools, add_generation_prompt, forced_tool, close)
    else:
        out = glm45.pieces(messages, tools, add_generation_prompt, enable_thinking, forced_tool, close)
    return out.items, len(messages)


def render_text(messages, tools=None, fmt: str = "glm4", *, add_generation_prompt: bool = True,
                enable_thinking: bool = True, forced_tool: str | None = None, close_last_turn: bool = False) -> str:
    """The conversation as text, exactly what the format's published template renders (HF settings)."""
    items, _ = _pieces(messages, tools, fmt, add_generation_prompt, enable_thinking, forced_tool, close_last_turn)
    return join(items)


def render(messages, tools=None, fmt: str = "glm4", *, tokenizer, add_generation_prompt: bool = True,
           enable_thinking: bool = True, forced_tool: str | None = None, close_last_turn: bool = False) -> Rendered:
    """The conversation as token ids with fine-tuning labels (see `Rendered`). Structural tokens are
    inserted by id; every text is encoded with allow_special=False."""
    _check_tokenizer(fmt, tokenizer)
    items, n = _pieces(messages, tools, fmt, add_generation_prompt, enable_thinking, forced_tool, close_last_turn)
    return tokenize(items, tokenizer, n)


def stop_ids(fmt: str, tokenizer) -> list[int]:
    """Ids that end a generated assistant turn: <|endoftext|>, <|user|>, <|observation|>."""
    _check_tokenizer(fmt, tokenizer)
    return [tokenizer.special_id(t) for t in _format(fmt).STOPS]


def make_parser(fmt: str, tokenizer, tools=None, *, forced_tool: str | None = None,
                make_id=new_call_id) -> ParserBase:
    """An incremental parser for what the model generates after the generation prompt. Only
    declared tools are parsed as calls. `make_id(index)` names the calls (default: random `call_...`)."""
    _check_tokenizer(fmt, tokenizer)
    tools = tools_from_dicts(list(tools) if isinstance(tools, tuple) else tools)
    cls = glm4.Glm4Parser if fmt == "glm4" else glm45.Glm45Parser
    return cls(tokenizer, tools, forced_tool, make_id)


def parse(ids, fmt: str, tokenizer, tools=None, *, forced_tool: str | None = None, finish_reason: str = "stop",
          make_id=new_call_id) -> AssistantMessage:
    """Generated ids (after the generation prompt; a stop id ends them) -> the assistant message, with
    what could not be parsed in its `parse_errors`."""
    parser = make_parser(fmt, tokenizer, tools, forced_tool=forced_tool, make_id=make_id)
    parser.feed_all(ids)
    parser.finish(finish_reason)
    return parser.message()


def chat_template(fmt: str) -> str:
    """glmkit's Jinja chat template for `fmt`, for `tokenizer_config.json` / `chat_template.jinja`:
    it renders what `render_text` renders, given OpenAI messages whose tool call arguments are
    mappings (HF's convention; vLLM parses the JSON strings for templates)."""
    _format(fmt)
    return (TEMPLATES / f"{fmt}.jinja").read_text(encoding="utf-8")
