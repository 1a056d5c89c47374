"""Server-side tools (`glmkit serve --tools python,browser`): the built-in tools run on the server.

Each conversation gets its own `Toolbox` (`glmkit.chat.agent`): a sandboxed Python interpreter in
`workspace/<conversation>` and a browser, declared in the chat format's style (glm4: GLM-4's `python`
and `simple_browser`; glm45: `python(code)` and `browser_search` / `browser_open` / `browser_find`).
A conversation is named by the `X-Conversation-Id` header, else the request's `user` field, else it
lasts one request; its toolbox is closed after `idle_timeout_s` without a request.

A request then runs in rounds (`tool_rounds`): the prompt declares the server's tools before the
client's; when a reply calls only server tools, they run (in a worker thread, never in the event
loop), the call and its results join the conversation, and the model goes on; the first reply with
no server call ends the request. Calls of the client's own functions go back as `tool_calls`, as
OpenAI does (a reply that calls both returns the client's calls only). The client sees the content
and reasoning of every round, concatenated, and usage summed over the rounds. Calls whose arguments
are not a JSON object end the request (their text is dropped).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from glmkit.chat.agent import Toolbox
from glmkit.serve.chat import Choice, choices_for, engine_request, plan_chat

MAX_ROUNDS = 8


class ServerTools:
    """One toolbox per conversation. `make_toolbox(folder)` builds a conversation's toolbox (the
    server's choice of tools: a sandbox in `folder`, a browser)."""

    def __init__(self, make_toolbox: Callable[[Path], Toolbox], workspace: Path, fmt: str,
                 idle_timeout_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.make_toolbox, self.workspace, self.fmt = make_toolbox, Path(workspace), fmt
        self.idle_timeout_s, self.clock = idle_timeout_s, clock
        self._boxes: dict[str, tuple[Toolbox, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def conversation(header: str | None, user: str | None) -> str:
        key = header or user
        if not key:
            return "once-" + uuid.uuid4().hex[:12]
        return "c-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]   # a safe, short folder name
        # (short: the kernel's socket paths live in the folder and must stay under ~100 bytes)

    def get(self, conversation: str) -> Toolbox:
        self.close_idle()
        with self._lock:
            box = self._boxes[conversation][0] if conversation in self._boxes else None
            if box is None:
                box = self.make_toolbox(self.workspace / conversation)
                box.use_dialect(self.fmt)
            self._boxes[conversation] = (box, self.clock())
            return box

    def release(self, conversation: str) -> None:
        """A one-request conversation is over: close its toolbox now."""
        if conversation.startswith("once-"):
            with self._lock:
                entry = self._boxes.pop(conversation, None)
            if entry is not None:
                entry[0].close()

    def close_idle(self) -> list[str]:
        now = self.clock()
        with self._lock:
            idle = [c for c, (_, t) in self._boxes.items() if now - t > self.idle_timeout_s]
            boxes = [self._boxes.pop(c)[0] for c in idle]
        for box in boxes:
            box.close()
        return idle

    def close(self) -> None:
        with self._lock:
            boxes, self._boxes = [b for b, _ in self._boxes.values()], {}
        for box in boxes:
            box.close()


async def tool_rounds(server, body, toolbox: Toolbox, request=None) -> AsyncIterator[tuple[str, object]]:
    """Events of a request with server-side tools: ("delta", OpenAI delta dict), ("keepalive", None),
    and last ("end", (finish_reason, prompt_tokens, completion_tokens))."""
    cfg, tok = server.config, server.tok
    names = set(toolbox.names)
    messages = list(body.messages)
    prompt_tokens = completion_tokens = 0
    client_index: dict[tuple[int, int], int] = {}
    finish = "stop"
    for round_ in range(MAX_ROUNDS):
        req = body.model_copy(update={"messages": messages, "tools": [*toolbox.specs(), *(body.tools or [])]})
        plan = plan_chat(req, cfg.fmt, tok, server.table, cfg.template)
        max_tokens = server.budget(len(plan.prompt), body.max_completion_tokens or body.max_tokens, "messages")
        sub = server.submit(engine_request(plan, req, max_tokens, cfg.causal, server.hook(plan.prompt)), 1)
        [choice] = choices_for(plan, req, cfg.fmt, tok, 1)
        on_server: set[int] = set()
        async for _, o in server.outputs(sub, {sub.rids[0]: 0}, [choice], request):
            if o is None:
                yield "keepalive", None
                continue
            for d in choice.feed(o):
                if "tool_calls" not in d:
                    yield "delta", d
                    continue
                tc = dict(d["tool_calls"][0])
                if tc.get("function", {}).get("name") in names:
                    on_server.add(tc["index"])
                if tc["index"] in on_server:
                    continue
                key = (round_, tc["index"])
                tc["index"] = client_index.setdefault(key, len(client_index))
                yield "delta", {"tool_calls": [tc]}
        prompt_tokens += len(plan.prompt)
        completion_tokens += choice.tokens
        finish = choice.finish or "stop"
        calls = _server_calls(choice, on_server)
        if finish != "tool_calls" or not calls or any(i not in on_server for i in choice.calls):
            break
        results = await asyncio.to_thread(toolbox.run, [(c["name"], c["arguments"]) for c in calls], time.monotonic)
        messages = [*messages, _assistant(choice, calls),
                    *({"role": "tool", "tool_call_id": c["id"], "content": r.content} for c, (r, _) in zip(calls, results))]
        finish = "stop"
    if finish == "tool_calls" and not client_index:
        finish = "stop"                       # only server calls, left unrun (unreadable, or out of rounds)
    yield "end", (finish, prompt_tokens, completion_tokens)


def _server_calls(choice: Choice, on_server: set[int]) -> list[dict] | None:
    """The reply's server calls, or None when one of them has arguments that are not a JSON object."""
    calls = [c for i, c in sorted(choice.calls.items()) if i in on_server]
    for c in calls:
        try:
            if not isinstance(json.loads(c["arguments"]), dict):
                return None
        except ValueError:
            return None
    return calls


def _assistant(choice: Choice, calls: list[dict]) -> dict:
    return {"role": "assistant", "content": "".join(choice.content) or None,
            "reasoning_content": "".join(choice.reasoning) or None,
            "tool_calls": [{"id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
