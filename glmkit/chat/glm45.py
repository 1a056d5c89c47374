"""The `glm45` chat format (GLM-4.5 / 4.6): renderer and incremental parser.

Rendering, byte for byte what the published template gives under HF's Jinja settings (DESIGN.md §5):

    [gMASK]<sop>
    <|system|>\\n# Tools ... <tools>\\n{tool json}\\n...</tools>\\n\\n... </tool_call>   when tools are declared
    <|system|>\\n{content}          <|user|>\\n{content}[/nothink when thinking is off]
    <|assistant|>\\n<think>{reasoning}</think>[\\n{content}]{\\n<tool_call>{name}\\n
        <arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n ... </tool_call>}
    <|observation|>\\n<tool_response>\\n{result}\\n</tool_response>   (consecutive results share one
        <|observation|>, each adding its own \\n<tool_response>...)
    <|assistant|>[\\n<think></think>]   the generation prompt, the bracket when thinking is off

Tools are `json.dumps(tool, ensure_ascii=False)`, one a line. Argument values: strings raw, anything
else `json.dumps(v, ensure_ascii=False)`. Reasoning (`reasoning_content`, else the text of the
content before `</think>`) is kept, stripped, only on assistant turns after the last user message;
earlier ones render `<think></think>`. Content is stripped. The tool-format example in the tools
block is made of the structural tokens themselves, as HF's tokenizer makes it from the template.

Parsing: optional whitespace, `<think>` reasoning `</think>`, content, then calls. A call's name is
streamed when its line ends; each argument's JSON follows as soon as it is known: a value whose
declared JSON Schema type is "string" streams raw text JSON-escaped; any other value is parsed as
JSON when its </arg_value> arrives (a value that is not JSON becomes a string). An undeclared tool
name keeps the whole call as content text; stray text inside a call, an unclosed tag or a call cut
off are reported in `parse_errors`.
"""

from __future__ import annotations

import json

from glmkit.chat.messages import (
    NAME_PATTERN,
    AssistantMessage,
    Message,
    SystemMessage,
    ToolMessage,
    ToolSpec,
    UserMessage,
    text_of,
)
from glmkit.chat.pieces import PROMPT, Pieces
from glmkit.chat.stream import ParserBase, Stripped, new_call_id

TOOLS_HEAD = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_FORMAT = "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
STRUCTURE = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
             "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
             "<tool_response>", "</tool_response>")
STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")
NOTHINK = "/nothink"


def split_reasoning(msg: AssistantMessage) -> tuple[str, str]:
    """(reasoning, content) as the template reads them from an assistant message."""
    content = text_of(msg.content)
    if isinstance(msg.reasoning_content, str):
        return msg.reasoning_content, content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def pieces(messages: list[Message], tools: list[ToolSpec], add_generation_prompt: bool, enable_thinking: bool,
           forced_tool: str | None, close_last_turn: bool) -> Pieces:
    out = Pieces()
    out.tok("[gMASK]", "<sop>")
    if tools:
        out.tok("<|system|>")
        out.text(TOOLS_HEAD + "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tools)
                 + TOOLS_FORMAT)
        out.tok("<tool_call>")
        out.text("{function-name}\n")
        for i in (1, 2):
            out.tok("<arg_key>")
            out.text(f"{{arg-key-{i}}}")
            out.tok("</arg_key>")
            out.text("\n")
            out.tok("<arg_value>")
            out.text(f"{{arg-value-{i}}}")
            out.tok("</arg_value>")
            out.text("\n")
        out.text("...\n")
        out.tok("</tool_call>")
    last_user = max((m for m, msg in enumerate(messages) if isinstance(msg, UserMessage)), default=-1)
    for m, msg in enumerate(messages):
        out.at(m, assistant=isinstance(msg, AssistantMessage))
        if isinstance(msg, UserMessage):
            text = msg.text
            out.tok("<|user|>")
            out.text("\n" + text + (NOTHINK if not enable_thinking and not text.endswith(NOTHINK) else ""))
        elif isinstance(msg, SystemMessage):
            out.tok("<|system|>")
            out.text("\n" + msg.text)
        elif isinstance(msg, ToolMessage):
            if m == 0 or not isinstance(messages[m - 1], ToolMessage):
                out.tok("<|observation|>")
            out.text("\n")
            out.tok("<tool_response>")
            out.text("\n" + msg.text + "\n")
            out.tok("</tool_response>")
        else:
            reasoning, content = split_reasoning(msg)
            out.tok("<|assistant|>")
            out.text("\n")
            out.tok("<think>")
            if m > last_user and reasoning:
                out.text(reasoning.strip())
            out.tok("</think>")
            if content.strip():
                out.text("\n" + content.strip())
            for call in msg.tool_calls:
                out.text("\n")
                out.tok("<tool_call>")
                out.text(call.function.name + "\n")
                for key, value in call.function.parsed_arguments().items():
                    out.tok("<arg_key>")
                    out.text(key)
                    out.tok("</arg_key>")
                    out.text("\n")
                    out.tok("<arg_value>")
                    out.text(value_text(value))
                    out.tok("</arg_value>")
                    out.text("\n")
                out.tok("</tool_call>")
    out.at(PROMPT)
    if add_generation_prompt:
        out.tok("<|assistant|>")
        if not enable_thinking or forced_tool:
            out.text("\n")
            out.tok("<think>", "</think>")
        if forced_tool:
            out.text("\n")
            out.tok("<tool_call>")
            out.text(forced_tool + "\n")
    elif close_last_turn:
        out.tok("<|user|>")
    return out


def is_string_schema(schema: dict | None) -> bool:
    kind = (schema or {}).get("type")
    return kind == "string" or (isinstance(kind, list) and kind == ["string"])


class Glm45Parser(ParserBase):
    """States: start (before any text), reasoning, content, name (of a call), args (between tags
    of a call), key, value, rejected (an undeclared tool's call, passed through as content)."""

    def __init__(self, tokenizer, tools: list[ToolSpec] | None = None, forced_tool: str | None = None,
                 make_id=new_call_id):
        super().__init__(tokenizer, [tokenizer.special_id(s) for s in STOPS], make_id)
        self.structural = {tokenizer.special_id(s): s for s in STRUCTURE[6:]}
        self.tools = {t.name if t.type == "function" else t.type: t for t in tools or []}
        self.state = "start"
        self.text_out = Stripped()  # reasoning or content being streamed, stripped
        self.buf = ""  # name, key or (non-string) value being read
        self.key: str | None = None
        self.n_args = 0
        self.raw_value = False
        self.stray = ""  # text inside a call but outside its tags
        if forced_tool:
            self.state, self.buf = "name", forced_tool + "\n"
            self._text("")

    # ------------------------------------------------------------------ structural tokens
    def _token(self, tok: str) -> None:
        state = self.state
        if state == "start" and tok == "<think>":
            self.state, self.text_out = "reasoning", Stripped()
        elif state == "reasoning" and tok == "</think>":
            self.state, self.text_out = "content", Stripped()
        elif state == "start" and tok == "</think>":
            self.state = "content"
        elif state in ("start", "content") and tok == "<tool_call>":
            self.state, self.buf = "name", ""
        elif state == "name":
            self._name_done(tok)
        elif state == "args":
            self._args_token(tok)
        elif state == "key":
            if tok == "</arg_key>":
                self.key, self.state = self.buf.strip(), "args"
            elif tok == "<arg_value>":
                self.errors.append(f"tool call {len(self._calls) - 1}: an <arg_key> was not closed")
                self.key = self.buf.strip()
                self._value_start()
            else:
                self._broken(f"{tok} inside <arg_key>", tok)
        elif state == "value":
            if tok == "</arg_value>":
                self._value_done()
            elif tok == "</tool_call>":
                self._broken("an <arg_value> was not closed", tok)
            else:
                self._value_text(tok)
        elif state == "rejected":
            self._content(self.text_out.push(tok))
            if tok == "</tool_call>":
                self.state, self.text_out = "content", Stripped()
        else:  # reasoning or content: any other structural token is text there
            self._text(tok)

    def _args_token(self, tok: str) -> None:
        if self.stray.strip():
            self.errors.append(f"tool call {len(self._calls) - 1}: text between arguments ignored: {self.stray[:80]!r}")
        self.stray = ""
        if tok == "<arg_key>":
            self.state, self.buf = "key", ""
        elif tok == "<arg_value>":
            if self.key is None:
                self.errors.append(f"tool call {len(self._calls) - 1}: an <arg_value> without an <arg_key>; ignored")
            self._value_start()
        elif tok == "</tool_call>":
            self._call_done()
        else:
            self.errors.append(f"tool call {len(self._calls) - 1}: unexpected {tok} between arguments; ignored")

    # ------------------------------------------------------------------ text
    def _text(self, text: str) -> None:
        state = self.state
        if state == "start":
            if text.strip():
                self.state = "content"
                self._content(self.text_out.push(text))
        elif state == "reasoning":
            self._reasoning(self.text_out.push(text))
        elif state in ("content", "rejected"):
            self._content(self.text_out.push(text))
        elif state == "name":
            self.buf += text
            name, newline, rest = self.buf.partition("\n")
            if newline:
                self._name_done(None)
                if rest:
                    self._text(rest)
            elif self.buf.strip() and not NAME_PATTERN.fullmatch(self.buf.strip()):
                self._reject(self.buf.strip())
        elif state == "args":
            self.stray += text  # reported once, at the next tag
        elif state == "key":
            self.buf += text
        else:
            self._value_text(text)

    # ------------------------------------------------------------------ calls
    def _name_done(self, tok: str | None) -> None:
        name = self.buf.partition("\n")[0].strip()
        if name not in self.tools:
            self._reject(name)
            if tok is not None:
                self._token(tok)
            return
        self.state, self.key, self.n_args = "args", None, 0
        self._start_call(name)
        if tok is not None:
            self._args_token(tok)

    def _reject(self, name: str) -> None:
        self.errors.append(f"the model called {name!r}, which is not a declared tool; kept as content")
        self.state = "rejected"
        self._content(self.text_out.push("<tool_call>" + self.buf))
        self.buf = ""

    def _value_start(self) -> None:
        self.state, self.buf = "value", ""
        tool = self.tools[self._calls[-1].name]
        self.raw_value = self.key is not None and is_string_schema(tool.property_schema(self.key))
        if self.raw_value:
            self._arguments(self._key_prefix() + '"')

    def _value_text(self, text: str) -> None:
        if self.raw_value:
            self._arguments(json.dumps(text, ensure_ascii=False)[1:-1])
        else:
            self.buf += text

    def _value_done(self) -> None:
        self.state = "args"
        if self.raw_value:
            self._arguments('"')
        elif self.key is not None:
            try:
                value = json.loads(self.buf)
            except json.JSONDecodeError:
                value = self.buf
            self._arguments(self._key_prefix() + json.dumps(value, ensure_ascii=False))
        self.key = None

    def _key_prefix(self) -> str:
        self.n_args += 1
        return ("{" if self.n_args == 1 else ", ") + json.dumps(self.key, ensure_ascii=False) + ": "

    def _call_done(self) -> None:
        self._arguments("}" if self.n_args else "{}")
        self._close_call()
        self.state, self.text_out = "content", Stripped()

    def _broken(self, problem: str, tok: str) -> None:
        self.errors.append(f"tool call {len(self._calls) - 1}: {problem}")
        if self.state == "value" and self.raw_value:
            self._arguments('"')
        self.state, self.key = "args", None
        self._args_token(tok)

    def _end(self, reason: str) -> None:
        if self.state == "name" and self.buf.strip():
            self.errors.append("a <tool_call> was cut off before its name ended; kept as content")
            self.state = "rejected"
            self._content(self.text_out.push("<tool_call>" + self.buf))
