"""The `glm4` chat format (GLM-4-9B-chat): renderer and incremental parser.

Rendering, byte for byte what the published template gives under HF's Jinja settings for the
conversation mapped the way GLM-4's own API server maps OpenAI messages (DESIGN.md §5):

    [gMASK]<sop>
    <|system|>\\n{ChatGLM prompt}\\n\\n# 可用工具{tool}{tool}...   when tools are declared, first
        function tool:  \\n## {name}\\n\\n{json.dumps(function, ensure_ascii=False, indent=4)}\\n在调用上述函数时，请使用 Json 格式表示调用的参数。
        built-in tool:  \\n## {python | simple_browser | cogview}\\n\\n{its description}
    <|system|>\\n{content}   <|user|>\\n{content}   <|observation|>\\n{tool result}
    <|assistant|>\\n{content}                  an assistant's text
    <|assistant|>{name}\\n{json arguments}     each of its tool calls (json.dumps, ensure_ascii=False)
    <|assistant|>python\\n{code}               a call of a built-in tool whose arguments are its one text:
                                               python {"code"}, simple_browser {"command"}, cogview {"prompt"}
    <|assistant|>                              the generation prompt; <|assistant|>{name}\\n forces a call

A message whose text is empty is not rendered (the template skips it); there is no end-of-turn
token: the next role token ends a turn, and generation stops on <|endoftext|>, <|user|> or
<|observation|>. `reasoning_content` has no place in this format and is dropped; tool call ids are
not rendered (results follow calls in order).

Parsing (what the model writes after `<|assistant|>`): a metadata line; empty -> the text after it
is content; a declared tool's name -> its arguments follow (the raw text of a built-in tool, e.g.
`python`'s code, streamed as the JSON {"code": ...}); a further `<|assistant|>` in the same turn
starts another block (a second call, or more content). A first line that cannot be a name is
content from its first character; an undeclared name is kept as content and reported in
`parse_errors`; arguments that are not a JSON object are kept and reported.
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
)
from glmkit.chat.pieces import PROMPT, Pieces
from glmkit.chat.stream import ParserBase, new_call_id

SYSTEM_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                 "你的任务是针对用户的问题和要求提供适当的答复和支持。")
FUNCTION_SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
# GLM-4's descriptions of its built-in tools, as its chat template words them
BUILTIN_DESCRIPTIONS = {
    "python": (
        "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
        "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"),
    "simple_browser": (
        "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
        "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。"
        "选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，"
        "你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n\n"
        "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
        "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"),
    "cogview": (
        "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
        "你需要向 `cogview` 发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"),
}
# GLM-4's built-in tools are called with raw text (code, a browser command such as search("..."), an
# image prompt), not JSON; glmkit carries it as the one argument named here. These names are reserved.
RAW_TEXT_TOOLS = {"python": "code", "simple_browser": "command", "cogview": "prompt"}
STRUCTURE = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def tools_text(tools: list[ToolSpec]) -> str:
    text = f"\n{SYSTEM_PROMPT}\n\n# 可用工具"
    for t in tools:
        if t.type == "function":
            spec = json.dumps(t.function_dict(), ensure_ascii=False, indent=4)
            text += f"\n## {t.name}\n\n{spec}\n{FUNCTION_SUFFIX}"
        else:
            text += f"\n## {t.type}\n\n{BUILTIN_DESCRIPTIONS[t.type]}"
    return text


def call_text(name: str, arguments: dict) -> str:
    """What follows `<|assistant|>{name}\\n` for a call."""
    key = RAW_TEXT_TOOLS.get(name)
    if key is not None and list(arguments) == [key] and isinstance(arguments[key], str):
        return arguments[key]
    return json.dumps(arguments, ensure_ascii=False)


def pieces(messages: list[Message], tools: list[ToolSpec], add_generation_prompt: bool,
           forced_tool: str | None, close_last_turn: bool) -> Pieces:
    out = Pieces()
    out.tok("[gMASK]", "<sop>")
    if tools:
        out.tok("<|system|>")
        out.text(tools_text(tools))
    for m, msg in enumerate(messages):
        if isinstance(msg, (SystemMessage, UserMessage, ToolMessage)):
            role = "<|observation|>" if isinstance(msg, ToolMessage) else f"<|{msg.role}|>"
            if msg.text:
                out.at(m).tok(role)
                out.text("\n" + msg.text)
            continue
        assert isinstance(msg, AssistantMessage)
        out.at(m, assistant=True)
        if msg.text:
            out.tok("<|assistant|>")
            out.text("\n" + msg.text)
        for call in msg.tool_calls:
            body = call_text(call.function.name, call.function.parsed_arguments())
            if body:  # a built-in tool's empty text renders nothing, like any empty item
                out.tok("<|assistant|>")
                out.text(f"{call.function.name}\n{body}")
    out.at(PROMPT)
    if add_generation_prompt:
        out.tok("<|assistant|>")
        if forced_tool:
            out.text(forced_tool + "\n")
    elif close_last_turn:
        out.tok("<|user|>")  # what GLM-4's fine-tuning appends after the last reply
    return out


class Glm4Parser(ParserBase):
    def __init__(self, tokenizer, tools: list[ToolSpec] | None = None, forced_tool: str | None = None,
                 make_id=new_call_id):
        super().__init__(tokenizer, [tokenizer.special_id(s) for s in STOPS], make_id)
        self.structural = {tokenizer.special_id("<|assistant|>"): "<|assistant|>"}
        tools = tools or []
        self.known = {t.name if t.type == "function" else t.type for t in tools}
        self.state = "meta"
        self.line = ""
        self.raw_key: str | None = None  # the argument holding a built-in tool's raw text
        if forced_tool:
            self._begin_call(forced_tool)

    def _token(self, name: str) -> None:  # only <|assistant|>: a new block of the same turn
        self._end_block(complete=True)
        self.state, self.line = "meta", ""

    def _text(self, text: str) -> None:
        if self.state == "meta":
            self.line += text
            line, newline, rest = self.line.partition("\n")
            if newline:
                self._metadata(line)
                if rest:
                    self._text(rest)
            elif not NAME_PATTERN.fullmatch(self.line) and self.line:
                self.state = "content"  # cannot be a name: the model is writing text
                self._content(self.line)
        elif self.state == "content":
            self._content(text)
        elif self.raw_key is not None:
            self._arguments(json.dumps(text, ensure_ascii=False)[1:-1])
        else:
            self._arguments(text)

    def _metadata(self, line: str) -> None:
        if not line:
            self.state = "content"
        elif line in self.known:
            self._begin_call(line)
        else:
            self.errors.append(f"the model called {line!r}, which is not a declared tool; kept as content")
            self.state = "content"
            self._content(line + "\n")

    def _begin_call(self, name: str) -> None:
        self.state = "call"
        self._start_call(name)
        self.raw_key = RAW_TEXT_TOOLS.get(name)
        if self.raw_key is not None:
            self._arguments("{" + json.dumps(self.raw_key) + ': "')

    def _end_block(self, complete: bool) -> None:
        if self.state == "meta" and self.line:
            self._content(self.line)  # a first line that never ended: text
        if self.state != "call" or not complete:
            return
        if self.raw_key is not None:
            self._arguments('"}')
        self._close_call()
        index, call = len(self._calls) - 1, self._calls[-1]
        try:
            ok = isinstance(json.loads(call.arguments), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            self.errors.append(f"tool call {index} ({call.name}): the arguments are not a JSON object: "
                               f"{call.arguments[:80]!r}")

    def _end(self, reason: str) -> None:
        self._end_block(complete=reason == "stop")
