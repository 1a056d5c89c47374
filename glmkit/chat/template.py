"""Render a conversation with a checkpoint's own Jinja chat template, safely.

DESIGN.md §5: a checkpoint that ships a `chat_template` is rendered with it (Jinja with HF's
settings: a sandbox, `trim_blocks`, `lstrip_blocks`, `loopcontrols`, `tojson` as `json.dumps` with
non-ASCII kept, `raise_exception`, `strftime_now`). HF's `apply_chat_template(tokenize=True)` then
tokenizes the rendered text with its special tokens matched, so a user who types `<|assistant|>`
makes a structural token. `render_template` never does:

1. every special-token spelling in every string of the messages and tools (contents, names,
   argument keys and values, descriptions) is replaced by a private-use character of its own;
2. the template renders; every special-token spelling left in its output is the template's own,
   and becomes its id;
3. the text between them gets the user's spellings back and is encoded with allow_special=False.

So the ids equal what HF gives whenever no message text spells a special token, and otherwise the
spelling stays characters. One consequence: a template's string tests cannot see such a spelling
in a message (GLM-4.5's template does not split an assistant's content at a typed `</think>`).
Tool call arguments are passed as mappings (HF's convention for templates), an assistant's null
content as "" (GLM-4.5's published template would print the text "None" for it).

Labels follow the GLM rule (see `Rendered`) from the role tokens: a token is learned when the one
before it lies in an assistant turn, from its `<|assistant|>` up to the next `<|user|>`,
`<|system|>`, `<|observation|>` or `<|endoftext|>`. Spans are not known here (empty).

GLM-4-9B-chat's published template reads tools from `item['tools']` of a message and calls from
`metadata` items, not from OpenAI messages: use the `glm4` renderer for it (it renders the same
bytes). Needs `jinja2` (the `chat` extra).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from glmkit.chat.messages import AssistantMessage, MessageError
from glmkit.chat.pieces import Rendered
from glmkit.chat.render import validated
from glmkit.errors import GlmkitError

PRIVATE_USE = 0xF0000  # Supplementary Private Use Area-A: stand-ins for special-token spellings
ROLE_ENDS = ("<|user|>", "<|system|>", "<|observation|>", "<|endoftext|>")


def render_template(template: str, messages, tools=None, *, tokenizer, add_generation_prompt: bool = True,
                    enable_thinking: bool = True, **variables) -> Rendered:
    """`messages` / `tools`: message and `ToolSpec` objects or OpenAI dicts (validated). `variables`
    reach the template as they are (e.g. `bos_token`); `enable_thinking` is passed only when False,
    so templates that test `enable_thinking is defined` see what HF users see."""
    messages, tools = validated(messages, tools)
    spellings = sorted({tokenizer.id_to_token(i) for i in tokenizer.special_ids}, key=len, reverse=True)
    hidden = {s: chr(PRIVATE_USE + k) for k, s in enumerate(spellings)}
    shown = {c: s for s, c in hidden.items()}
    specials = re.compile("|".join(map(re.escape, spellings)))

    def conceal(value, where: str):
        if isinstance(value, str):
            if any(PRIVATE_USE <= ord(c) < PRIVATE_USE + len(spellings) for c in value):
                raise MessageError(where, "holds characters U+F0000.. (private use) that glmkit reserves while "
                                   "rendering a chat template; remove them")
            return specials.sub(lambda m: hidden[m.group()], value)
        if isinstance(value, dict):
            return {conceal(k, where): conceal(v, where) for k, v in value.items()}
        if isinstance(value, list):
            return [conceal(v, where) for v in value]
        return value

    data = []
    for m, msg in enumerate(messages):
        d = msg.to_dict()
        if isinstance(msg, AssistantMessage):
            # null content as "": GLM-4.5's published template would print "None" (vLLM passes "")
            d["content"] = "" if d["content"] is None else d["content"]
            for call, c in zip(msg.tool_calls, d.get("tool_calls", [])):
                c["function"]["arguments"] = call.function.parsed_arguments()
        data.append(conceal(d, f"messages[{m}]"))
    context = dict(variables, messages=data, add_generation_prompt=add_generation_prompt,
                   tools=conceal([t.to_dict() for t in tools], "tools") or None)
    if not enable_thinking:
        context["enable_thinking"] = False
    try:
        text = compile_template(template).render(**context)
    except GlmkitError:
        raise
    except Exception as e:  # a template's raise_exception, or an error in the template itself
        raise GlmkitError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from e
    ids = _tokenize(text, specials, shown, tokenizer)
    return Rendered(ids, role_labels(ids, tokenizer, add_generation_prompt), [])


def _tokenize(text: str, specials: re.Pattern, shown: dict[str, str], tokenizer) -> list[int]:
    hidden = re.compile("[" + "".join(map(re.escape, shown)) + "]") if shown else None

    def encode(run: str) -> list[int]:
        return tokenizer.encode(hidden.sub(lambda m: shown[m.group()], run) if hidden else run, allow_special=False)

    ids: list[int] = []
    pos = 0
    for m in specials.finditer(text):
        ids += encode(text[pos:m.start()])
        ids.append(tokenizer.token_to_id(m.group()))
        pos = m.end()
    ids += encode(text[pos:])
    return ids


def role_labels(ids: list[int], tokenizer, generation_prompt: bool) -> list[int]:
    """GLM's fine-tuning labels from the role tokens (see the module docstring); what follows the
    generation prompt's <|assistant|> (a prefill such as an empty <think></think>) is not learned."""
    ends = {tokenizer.special_id(t) for t in ROLE_ENDS} - {None}
    labels, inside = [], False
    for i in ids:
        labels.append(i if inside else -100)
        if i == tokenizer.assistant_id:
            inside = True
        elif i in ends:
            inside = False
    if generation_prompt and tokenizer.assistant_id in ids:
        last = len(ids) - 1 - ids[::-1].index(tokenizer.assistant_id)
        labels[last + 1:] = [-100] * (len(ids) - last - 1)
    return labels


@lru_cache(maxsize=8)
def compile_template(template: str):
    """A Jinja template compiled with HF's chat-template settings."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise GlmkitError("rendering a checkpoint's chat template needs jinja2: install glmkit's chat extra "
                          "(pip install -e '.[chat]')") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise GlmkitError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from e
