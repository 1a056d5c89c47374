"""Chat and tools (GLM-4 All Tools): the message model, the GLM chat formats and their parsers,
tool calling, the tools themselves and the agent loop.

- `messages`: one message model in the OpenAI chat-completions shape (system, user, assistant with
  content / tool_calls / reasoning_content, tool) and tool declarations (`ToolSpec`); plain
  dataclasses with `from_dict` / `to_dict` and validation errors that name the bad field.
- `render`: conversations to token ids (`render`, with fine-tuning labels) or text (`render_text`)
  in the `glm4` (GLM-4-9B-chat) and `glm45` (GLM-4.5 / 4.6) formats, byte for byte what the
  published chat templates give (DESIGN.md §5); stop ids; parsing; the Jinja templates glmkit
  ships (`chat_template`, files under `templates/`).
- `glm4`, `glm45`: each format's renderer and incremental parser (generated ids in, OpenAI-style
  deltas out: content, reasoning, tool calls, finish reason); `pieces`: a rendering before
  tokenization; `stream`: deltas, UTF-8-safe incremental decoding, the parser base.
- `template`: rendering with a checkpoint's own Jinja chat template (HF's settings), with no
  structural token ever made from message text.
- `functions`: typed Python functions as callable tools, called safely.
- `browser`: the GLM-4-style browser (search / open / find, citations checked), one per
  conversation; `docstore`: its SQLite FTS5 document store (Chinese as character bigrams; the
  default corpus or a user's folder); `webpage`: allowlisted URL fetching and HTML to text.
- `agent`: the agent loop (`Agent`: render, generate on the engine, parse, run the tools, append the
  observations, until an answer or a cap; a JSONL transcript), `Toolbox` (a conversation's tools),
  `ScriptedModel` (a logits processor that makes the engine generate fixed replies, for tests).
- `sandbox`: the `python` tool's interpreter, a stateful IPython kernel per conversation in a
  bubblewrap sandbox (`Sandbox`, `SandboxPool`, `Limits`, `ExecResult`); `jail`: how the kernel is
  confined (the bubblewrap command, the launcher that sets the rlimits and drops to a leased uid,
  `sandbox_problem`).

Imports `glmkit.errors`, `glmkit.data`, `glmkit.model`, `glmkit.checkpoint`, `glmkit.infer`; never
`train`, `eval`, `serve`, `bench` or `cli`.
"""

from glmkit.chat.messages import (
    AssistantMessage,
    FunctionCall,
    Message,
    MessageError,
    SystemMessage,
    ToolCall,
    ToolMessage,
    ToolSpec,
    UserMessage,
    message_from_dict,
    messages_from_dicts,
    tools_from_dicts,
)
from glmkit.chat.render import (
    FORMATS,
    Rendered,
    chat_template,
    make_parser,
    parse,
    render,
    render_text,
    stop_ids,
)
from glmkit.chat.stream import Delta, ToolCallDelta
from glmkit.chat.template import render_template

__all__ = [
    "AssistantMessage", "Delta", "FORMATS", "FunctionCall", "Message", "MessageError", "Rendered", "SystemMessage",
    "ToolCall", "ToolCallDelta", "ToolMessage", "ToolSpec", "UserMessage", "chat_template", "make_parser",
    "message_from_dict", "messages_from_dicts", "parse", "render", "render_template", "render_text", "stop_ids", "tools_from_dicts",
]
