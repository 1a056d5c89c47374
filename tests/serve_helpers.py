"""What the `glmkit serve` tests (tests/test_serve_*.py) share: the request pieces, a processor hook
that scripts the model's reply, and a real uvicorn server on 127.0.0.1 in a thread. The fixtures over
them (`chat_model`, `served`, `served_script`, `served_client`) are in conftest.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from glmkit.infer.engine import Engine
from glmkit.serve.app import ServeConfig, Server, create_app

MODEL = "tiny-chat"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "the time",
                                         "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Beijing?"}]


class Script:
    """The server's processor_hook: a prompt holding a marker gets the marker's token ids forced (the
    last one repeats; "raise" makes the engine step fail there); every prompt is recorded."""

    def __init__(self, tok):
        self.tok, self.scripts, self.prompts = tok, {}, []

    def add(self, marker: str, ids: list[int]) -> str:
        self.scripts[marker] = ids
        return marker

    def __call__(self, prompt: list[int]):
        self.prompts.append(prompt)
        text = self.tok.decode(prompt)
        ids = next((ids for m, ids in self.scripts.items() if m in text), None)
        if ids is None:
            return None

        def force(produced, row):
            want = ids[min(len(produced), len(ids) - 1)]       # the last id repeats
            if want == "raise":
                raise RuntimeError("scripted failure")
            out = torch.full_like(row, float("-inf"))
            out[want] = 0.0
            return out
        return force


@contextlib.contextmanager
def serving(model, tok, *, max_batch=8, max_len=1024, **config):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields (server, base_url)."""
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len)
    with running(Server(engine, tok, ServeConfig(model_name=MODEL, **config))) as s:
        yield s


@contextlib.contextmanager
def running(server: Server):
    """`server` behind a real uvicorn on 127.0.0.1 (a free port) in a thread; yields (server, base_url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import uvicorn
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(timeout=20)


def ids_of(tok, text: str, fmt_stop: str = "<|observation|>") -> list[int]:
    return tok.encode(text) + [tok.special_id(fmt_stop)]


def long_marker(script, tok) -> str:
    """A marker whose reply is " la" 2000 times: a request that runs until it is cut."""
    return script.add("FOREVER", tok.encode(" la") * 2000)
