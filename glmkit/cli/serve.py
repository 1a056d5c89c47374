"""`glmkit serve`: an OpenAI-compatible HTTP server for a checkpoint (docs/serve.md).

    glmkit serve runs/chat                                   # http://127.0.0.1:8000/v1
    glmkit serve GLM-4-9B-0414 --device cuda --port 8080 --api-key s3cret --max-concurrency 32
    glmkit serve runs/chat --tools python,browser            # the built-in tools run on the server
    glmkit serve runs/chat --quantize int8 --kv-dtype fp8     # int8 weights, fp8 KV cache (1/4 of fp32)

Binds 127.0.0.1 unless --host says otherwise (another host without --api-key gets a warning). Every
request joins the engine's continuous batch: --max-concurrency requests run at once (KV rows),
--max-queue more wait, beyond that the server answers 429.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from glmkit.cli.options import add_memory_arguments, check_device, existing_dir, nonnegative_int, positive_int
from glmkit.errors import GlmkitError

TOOLS = ("python", "browser")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_dir,
                        help="a glmkit run / checkpoint directory, or an HF GLM-4 folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive_int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    parser.add_argument("--max-concurrency", type=positive_int, default=16, help="requests decoded at once (KV rows)")
    parser.add_argument("--max-queue", type=nonnegative_int, default=64,
                        help="requests waiting for a row; more are refused with 429")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="tokens per request, prompt and reply (default: the model's context, at most 4096)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512,
                        help="most prompt tokens fed per forward: bounds prefill memory (default 512)")
    parser.add_argument("--max-tokens", type=positive_int, default=4096, help="the most tokens one request may ask for")
    parser.add_argument("--format", default="auto", choices=("auto", "glm4", "glm45"),
                        help="chat format, as `glmkit chat` chooses it (auto: the checkpoint's own chat template when "
                             "it ships one, else glm45 when the tokenizer has GLM-4.5's tokens, else glm4)")
    parser.add_argument("--tools", default="", help="server-side tools, comma-separated: python,browser "
                        "(one sandbox and browser per conversation: X-Conversation-Id header, else `user`)")
    parser.add_argument("--workspace", default=None,
                        help="--tools python: folder of the conversations' sandboxes (default: a new temporary one)")
    parser.add_argument("--unsafe-python", action="store_true",
                        help="--tools python: run the model's code without the sandbox when it cannot be built")
    parser.add_argument("--tools-idle-timeout", type=positive_int, default=900,
                        help="seconds after which an idle conversation's sandbox is closed")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    add_memory_arguments(parser)


def check(args: argparse.Namespace) -> list[str]:
    """Options checked before the model is read; returns the server-side tools asked for."""
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        raise GlmkitError(f"--tools {args.tools}: unknown tool {bad[0]!r}; choose from {', '.join(TOOLS)}")
    if "python" in tools and not args.unsafe_python:
        from glmkit.chat.sandbox import sandbox_problem
        problem = sandbox_problem()
        if problem is not None:
            raise GlmkitError(f"--tools python: cannot sandbox the interpreter: {problem}. Fix that, or pass "
                              "--unsafe-python to run the model's code without isolation")
    check_device(args.device)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise GlmkitError("glmkit serve needs FastAPI and uvicorn: pip install 'glmkit[serve]'") from None
    with socket.socket() as s:
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise GlmkitError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                              "choose another --port") from None
    return tools


def server_tools(tools: list[str], args: argparse.Namespace, fmt: str):
    """The conversations' toolboxes: a sandbox each (python), a browser each over one document store."""
    import tempfile

    from glmkit.chat.agent import Toolbox
    from glmkit.serve.tools import ServerTools
    store = None
    if "browser" in tools:
        from glmkit.chat.docstore import default_store
        store = default_store()

    def make(folder: Path) -> Toolbox:
        sandbox = browser = None
        if "python" in tools:
            from glmkit.chat.sandbox import Sandbox
            sandbox = Sandbox(folder, allow_unsandboxed=args.unsafe_python)
        if store is not None:
            from glmkit.chat.browser import Browser
            browser = Browser(store)
        return Toolbox(sandbox=sandbox, browser=browser)
    workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="glmkit-serve-"))
    return ServerTools(make, workspace, fmt, idle_timeout_s=args.tools_idle_timeout)


def snippet(url: str, model: str, api_key: str | None) -> str:
    return (f"from openai import OpenAI\n"
            f"client = OpenAI(base_url=\"{url}\", api_key=\"{api_key or 'none'}\")\n"
            f"reply = client.chat.completions.create(model=\"{model}\", "
            f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
            f"print(reply.choices[0].message.content)")


def make_server(args: argparse.Namespace, tools: list[str]):
    """Load the checkpoint (`--quantize`), build the engine (`--kv-dtype`) and the `Server`; returns
    (server, name, chat format), nothing bound yet."""
    from glmkit.chat.agent import choose_format, read_chat_template
    from glmkit.chat.render import stop_ids
    from glmkit.checkpoint.loader import load
    from glmkit.infer.engine import Engine
    from glmkit.serve.app import ServeConfig, Server

    loaded = load(args.checkpoint, args.device, quantize=args.quantize)
    model, tok = loaded.model, loaded.tokenizer
    chosen = choose_format(args.format, tok, template=read_chat_template(loaded.path) if args.format == "auto" else None)
    fmt = chosen.dialect
    stop_ids(fmt, tok)                            # the tokenizer has the format's special tokens
    name = args.model_name or Path(args.checkpoint).resolve().name
    engine = Engine(model, tok, max_batch=args.max_concurrency, max_len=args.max_len,
                    prefill_chunk=args.prefill_chunk, kv_dtype=args.kv_dtype)
    config = ServeConfig(model_name=name, fmt=fmt, causal=loaded.objective == "clm", api_key=args.api_key,
                         max_waiting=args.max_queue, max_tokens=args.max_tokens, template=chosen.template,
                         tools=server_tools(tools, args, fmt) if tools else None)
    return Server(engine, tok, config), name, chosen


def run(args: argparse.Namespace) -> int:
    tools = check(args)
    import uvicorn

    from glmkit.serve.app import create_app

    server, name, chosen = make_server(args, tools)
    app = create_app(server)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/v1"
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    memory = (f", {args.quantize} weights" if args.quantize else "") + \
        (f", {args.kv_dtype} KV cache" if args.kv_dtype != "auto" else "")
    print(f"glmkit serve: {name} ({chosen.name} chat format, {server.engine.max_len} tokens per request, "
          f"{args.max_concurrency} at once{memory}{', tools ' + ','.join(tools) if tools else ''}) at {url}\n\n"
          f"{snippet(url, name, args.api_key)}\n", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
