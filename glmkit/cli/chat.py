"""`glmkit chat`: a terminal chat with a model that can call tools.

    glmkit chat GLM-4-9B-0414 --tools python,browser
    glmkit chat runs/demo --functions my_tools.py --system "Answer briefly."
    glmkit chat GLM-4.5-Air --tools browser --browse-dir notes/ --thinking off
    glmkit chat CKPT --prompt "What is 2**100?" --tools python          # answers once and exits
    echo "What is 2**100?" | glmkit chat CKPT --tools python            # so does a prompt on standard input

The reply streams to standard output; the trace (reasoning, each tool call with its arguments and
result, why a turn stopped early) goes to standard error, so `glmkit chat ... > answer.txt` keeps the
answer alone. In the interactive chat, `/reset` starts over (a fresh interpreter, the browser's results
forgotten), `/save FILE` writes the conversation as OpenAI messages (JSON), `/exit` (or end of input)
quits. `--transcript FILE` appends every step as JSON Lines (`glmkit.chat.agent`).

Every option is checked, the `--functions` file imported and the python sandbox probed before the model
is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from glmkit.cli.options import (
    add_memory_arguments,
    check_device,
    check_output_file,
    existing_dir,
    existing_file,
    nonnegative_float,
    positive_int,
    probability,
    warn,
)
from glmkit.errors import GlmkitError

TOOLS = ("python", "browser")
TRACE_LINES = 12         # lines of a tool result shown in the trace (the model reads it all, up to the cap)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_dir,
                        help="a glmkit run / checkpoint folder, or an HF GLM-4 / GLM-4.5 folder")
    parser.add_argument("--prompt", help="answer this one message and exit (also: a prompt on standard input)")
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--format", default="auto", choices=("auto", "glm4", "glm45"),
                        help="chat format; auto: the checkpoint's chat_template if it ships one, else glm45 when "
                             "the tokenizer has GLM-4.5's structural tokens, else glm4")
    parser.add_argument("--thinking", choices=("on", "off"), default="on", help="glm45: reason before answering")
    parser.add_argument("--tools", default="", help="comma-separated built-in tools: python, browser")
    parser.add_argument("--functions", type=existing_file, help="a Python file whose functions become tools")
    parser.add_argument("--browse-dir", type=existing_dir,
                        help="the browser searches this folder's .txt/.md/.html files (default: the bilingual corpus)")
    parser.add_argument("--unsafe-python", action="store_true",
                        help="run the python tool without a sandbox where none can be built (the code runs as you)")
    parser.add_argument("--workspace", help="the python tool's folder (default: a new temporary folder)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024, help="per model reply")
    parser.add_argument("--max-rounds", type=positive_int, default=8, help="model replies per message")
    parser.add_argument("--max-calls", type=positive_int, default=16, help="tool calls per message")
    parser.add_argument("--max-observation-chars", type=positive_int, default=4000,
                        help="a tool result is cut to this many characters")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=probability, default=0.8, help="1 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--transcript", help="append every step to this JSON Lines file")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="tokens of the whole conversation (default: the model's context, at most 8192)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512,
                        help="most prompt tokens fed per forward: bounds prefill memory (default 512)")
    add_memory_arguments(parser)


def check(args: argparse.Namespace) -> list[str]:
    """Option checks that need no model; returns the built-in tools asked for."""
    check_device(args.device)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise GlmkitError(f"--tools {args.tools}: unknown tool {unknown[0]!r}; choose from {', '.join(TOOLS)} "
                          "(your own functions: --functions FILE)")
    if args.browse_dir and "browser" not in tools:
        raise GlmkitError("--browse-dir is for the browser: add --tools browser")
    if args.workspace and "python" not in tools:
        raise GlmkitError("--workspace is for the python tool: add --tools python")
    if args.unsafe_python and "python" not in tools:
        warn("chat", "--unsafe-python has no effect without --tools python")
    if args.transcript:
        check_output_file(args.transcript, "--transcript")
    if args.prompt is not None and not args.prompt.strip():
        raise GlmkitError("--prompt is empty; give the message to answer")
    return tools


def build_toolbox(args: argparse.Namespace, tools: list[str]):
    from glmkit.chat.agent import Toolbox
    functions = []
    if args.functions:
        from glmkit.chat.functions import load_functions
        functions = load_functions(args.functions)
    names = {t.name for t in functions} & {"python", "simple_browser", "browser_search", "browser_open", "browser_find"}
    if names:
        raise GlmkitError(f"--functions {args.functions}: {', '.join(sorted(names))} is the name of a built-in tool; "
                          "rename your function")
    sandbox = browser = None
    if "python" in tools:
        from glmkit.chat.sandbox import Sandbox, sandbox_problem
        problem = sandbox_problem()
        if problem is not None and not args.unsafe_python:
            raise GlmkitError(f"--tools python: cannot sandbox the interpreter: {problem}. Fix that, or pass "
                              "--unsafe-python to run the model's code without isolation")
        workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="glmkit-chat-"))
        sandbox = Sandbox(workspace, allow_unsandboxed=args.unsafe_python)
        _trace(f"[python: workspace {workspace}{'' if sandbox.sandboxed else ', NOT sandboxed'}]")
    if "browser" in tools:
        from glmkit.chat.browser import Browser
        from glmkit.chat.docstore import default_store, folder_store
        store = folder_store(args.browse_dir, log=_trace) if args.browse_dir else default_store(log=_trace)
        browser = Browser(store)
    return Toolbox(functions, sandbox=sandbox, browser=browser)


def run(args: argparse.Namespace, logits_processor=None) -> int:
    """`logits_processor`: passed to every generation (a `glmkit.chat.agent.ScriptedModel` in tests)."""
    tools = check(args)
    text = args.prompt
    if text is None and not sys.stdin.isatty():
        text = sys.stdin.read()
        if not text.strip():
            raise GlmkitError("standard input is empty; give a message (or --prompt TEXT, or run in a terminal)")
    toolbox = build_toolbox(args, tools)
    agent = None
    try:
        agent = make_agent(args, toolbox, logits_processor)
        if text is not None:
            show(agent.send(text.strip()))
            return 0
        return interactive(agent)
    finally:
        toolbox.close()
        if agent is not None:
            agent.close()


def make_agent(args: argparse.Namespace, toolbox, logits_processor=None):
    from glmkit.chat.agent import Agent, choose_format, read_chat_template
    from glmkit.checkpoint.loader import load
    from glmkit.infer.engine import Engine
    from glmkit.infer.sampling import SamplingConfig

    loaded = load(args.checkpoint, args.device, quantize=args.quantize)
    fmt = choose_format(args.format, loaded.tokenizer, template=read_chat_template(loaded.path))
    if args.thinking == "off" and fmt.dialect != "glm45":
        warn("chat", f"--thinking off is for the glm45 format; this chat uses {fmt.dialect}")
    limit = loaded.model.config.context_length
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=1, max_len=args.max_len or min(limit, 8192),
                    prefill_chunk=args.prefill_chunk, kv_dtype=args.kv_dtype)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    agent = Agent(engine, loaded.tokenizer, fmt=fmt, tools=toolbox, system=args.system,
                 causal=loaded.objective == "clm", sampling=sampling, enable_thinking=args.thinking == "on",
                 max_rounds=args.max_rounds, max_calls=args.max_calls,
                 max_observation_chars=args.max_observation_chars, transcript=args.transcript,
                 logits_processor=logits_processor)
    _trace(f"[{loaded.path}: format {fmt.name}{' (' + fmt.dialect + ')' if fmt.template else ''}, "
           f"tools: {', '.join(toolbox.names) or 'none'}]")
    return agent


def interactive(agent) -> int:
    """Read messages and commands until /exit or end of input. Ctrl-C stops the reply being generated;
    a conversation grown too long for the model is reported and the chat goes on (/reset)."""
    _trace("[/reset starts over, /save FILE writes the conversation, /exit quits; Ctrl-C stops a reply]")
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return 0
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            return 0
        if command == "/reset":
            agent.reset()
            _trace("[conversation reset]")
        elif command == "/save":
            if not rest.strip():
                _trace("[usage: /save FILE]")
                continue
            try:
                _trace(f"[saved {agent.save(check_output_file(rest.strip(), '/save'))}]")
            except (GlmkitError, OSError) as e:
                _trace(f"[cannot save: {e}]")
        elif line.strip():
            print("glm> ", end="", flush=True)
            try:
                show(agent.send(line))
            except KeyboardInterrupt:          # Ctrl-C stops this reply, not the chat
                _trace("\n[interrupted]")
            except GlmkitError as e:           # e.g. the conversation outgrew the model's positions
                _trace(f"\n[error: {e}; /reset starts over]")


def show(events) -> None:
    """Stream a turn: content to stdout, the trace to stderr."""
    from glmkit.chat.agent import ToolRun, TurnEnd
    where = None                                   # what the last printed piece was: content / reasoning
    for e in events:
        if isinstance(e, ToolRun):
            _trace(f"[{e.name}] " + "\n    ".join(_arguments(e.arguments).splitlines() or [""]))
            lines = e.result.splitlines() or [""]
            more = f"\n  ... {len(lines) - TRACE_LINES} more lines" if len(lines) > TRACE_LINES else ""
            _trace("  => " + "\n     ".join(lines[:TRACE_LINES]) + more)
            where = None
        elif isinstance(e, TurnEnd):
            if e.reason != "answer":
                why = {"length": "the reply reached --max-new-tokens", "max_rounds": "--max-rounds reached",
                       "max_calls": "--max-calls reached"}[e.reason]
                _trace(f"\n[stopped: {why}]")
            print(flush=True)
        elif e.reasoning_content:
            if where != "reasoning":
                _trace("[thinking] ", end="")
            _trace(e.reasoning_content, end="")
            where = "reasoning"
        elif e.tool_call is not None and e.tool_call.name is not None:
            _trace(f"\n[calling {e.tool_call.name} ...]")
            where = None
        elif e.content:
            if where == "reasoning":
                _trace("")
            print(e.content, end="", flush=True)
            where = "content"


def _arguments(arguments: str) -> str:
    """A call's arguments for the trace: one string argument (code, a query) as it is."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), str):
        return next(iter(value.values()))
    return arguments


def _trace(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)
