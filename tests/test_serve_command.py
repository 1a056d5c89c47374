"""`glmkit serve` as the command builds it: the real command in a subprocess (prints the URL and a
client snippet, answers, stops on SIGINT) and `make_server` with quantized weights and an fp8 KV
cache, each checked against the engine alone on the same checkpoint.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from serve_helpers import MODEL, USER, running  # noqa: E402

from glmkit.chat.render import parse, render, stop_ids  # noqa: E402
from glmkit.infer.engine import Engine  # noqa: E402
from glmkit.infer.sampling import SamplingConfig  # noqa: E402
from glmkit.infer.text import generate  # noqa: E402


@pytest.mark.slow
def test_glmkit_serve_command(tiny_run):
    """The command as users run it: prints the URL and a client snippet, answers the client, stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", str(tiny_run.directory), "--port", str(port),
                             "--api-key", "k", "--model-name", "toy"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        head = [proc.stdout.readline() for _ in range(3)]
        url = f"http://127.0.0.1:{port}/v1"
        assert url in head[0] and head[2].startswith("from openai import OpenAI")
        assert "glm45 chat format" in head[0]          # as `glmkit chat` chooses: the tokenizer has GLM-4.5's tokens
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=5)
        deadline = time.time() + 60
        while True:
            try:
                models = c.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["toy"]
        r = c.chat.completions.create(model="toy", messages=USER, max_tokens=3, temperature=0)
        from glmkit.checkpoint.loader import load
        from glmkit.infer.engine import Request
        loaded = load(tiny_run.directory)
        prompt = render(USER, None, "glm45", tokenizer=loaded.tokenizer).ids
        [alone] = Engine(loaded.model, loaded.tokenizer, max_batch=1).generate([Request.chat(
            prompt, SamplingConfig(max_new_tokens=3), stop_ids=tuple(stop_ids("glm45", loaded.tokenizer)))])
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone.tokens[0]))
        assert r.choices[0].finish_reason == ("length" if alone.finish_reason == "length" else "stop")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_quantized_weights_and_fp8_cache_from_the_command_line(tiny_run):
    """`glmkit serve --quantize int8 --kv-dtype fp8` builds its engine so (`make_server`, the command's
    own code), and a reply over HTTP equals the same quantized model's engine alone."""
    from glmkit.checkpoint.loader import load
    from glmkit.cli import serve as serve_cli
    from glmkit.cli import verb_parser
    from glmkit.infer.engine import Request
    from glmkit.model.quantize import QuantizedLinear

    args = verb_parser("serve").parse_args([str(tiny_run.directory), "--quantize", "int8", "--kv-dtype", "fp8",
                                            "--model-name", MODEL, "--max-len", "256"])
    server, name, chosen = serve_cli.make_server(args, [])
    assert name == MODEL and server.engine.pool.dtype == torch.float8_e4m3fn
    assert all(isinstance(b.self_attn.qkv_proj, QuantizedLinear) for b in server.engine.model.layers)
    with running(server) as (_, url):
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0)
        text = c.completions.create(model=MODEL, prompt="The weather in Beijing", max_tokens=6, temperature=0)
    loaded = load(tiny_run.directory, quantize="int8")
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=256, kv_dtype="fp8")
    [want] = generate(loaded.model, loaded.tokenizer, "The weather in Beijing", SamplingConfig(max_new_tokens=6),
                      engine=engine)
    assert text.usage.completion_tokens > 0 and text.choices[0].text == want
    prompt = render(USER, None, chosen.dialect, tokenizer=loaded.tokenizer).ids
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=256, kv_dtype="fp8")
    [alone] = engine.generate([Request.chat(prompt, SamplingConfig(max_new_tokens=6),
                                            stop_ids=tuple(stop_ids(chosen.dialect, loaded.tokenizer)))])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(alone.tokens[0]))
    finish = "length" if alone.finish_reason == "length" else "stop"
    assert r.choices[0].finish_reason == finish
    message = parse(alone.tokens[0], chosen.dialect, loaded.tokenizer, finish_reason=finish)
    assert (r.choices[0].message.content or None) == message.content
