"""The engine loop: one background thread steps the `Engine`; requests wait on asyncio queues.

    loop = EngineLoop(engine, max_waiting=64)
    loop.start()
    sub = loop.submit(request, n=1)     # in the event loop's thread; raises QueueFull (-> 429)
    while sub.open: out = await sub.get(timeout=15)     # `Output`s in order; None after a quiet 15 s
    loop.cancel(sub)                    # a client went away: its rows are freed at the next step

The thread is the only caller of `engine.step()`; `engine.add` and `engine.cancel` only enqueue, so
the event loop adds and cancels without a lock and generation never holds one. After each step the
outputs are grouped by request and handed to each request's `asyncio.Queue` in one
`loop.call_soon_threadsafe` call per request. When the engine has nothing to do the thread sleeps
on an event that `submit` / `cancel` set.

Admission: the engine runs `engine.pool.rows` requests at once (its KV rows); up to `max_waiting`
more wait for a row; beyond that `submit` raises `QueueFull` (the server answers 429 with a
Retry-After). If a step raises, every request in flight receives the exception (the server turns it
into a 500, or an error event mid-stream), the engine's requests are cancelled, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

from glmkit.infer.engine import Engine, Output, Request
from glmkit.serve.metrics import Metrics


class QueueFull(Exception):
    pass


class Submission:
    """The engine requests of one HTTP request (its `n` choices) and the one queue their outputs
    arrive on, in order."""

    def __init__(self, rids: list[int], queue: asyncio.Queue, prompt_tokens: int):
        self.rids, self.queue, self.prompt_tokens = rids, queue, prompt_tokens
        self.submitted = time.perf_counter()
        self.open = set(rids)

    async def get(self, timeout: float | None = None) -> Output | None:
        """The next output; None when `timeout` seconds pass without one. Raises what the engine raised."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(item, BaseException):
            self.open.clear()
            raise item
        if item.finished:
            self.open.discard(item.request)
        return item


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int = 64, metrics: Metrics | None = None):
        self.engine = engine
        self.capacity = engine.pool.rows + max_waiting
        self.metrics = metrics or Metrics()
        self.subs: dict[int, tuple[Submission, asyncio.AbstractEventLoop]] = {}
        self._lock = threading.Lock()             # guards `subs` only (never held while stepping)
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="glmkit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def in_flight(self) -> int:
        return len(self.subs)

    def submit(self, request: Request, n: int = 1, into: Submission | None = None) -> Submission:
        """Queue `n` copies of `request` (seeds seed, seed + 1, ... when seeded); call from the event loop.
        `into`: add them to an earlier submission (one queue for several prompts)."""
        with self._lock:
            if len(self.subs) + n > self.capacity:
                raise QueueFull(f"{len(self.subs)} requests are in flight and this server takes at most "
                                f"{self.capacity} ({self.engine.pool.rows} running + the waiting queue)")
            loop = asyncio.get_running_loop()
            rids = [self.engine.add(request if i == 0 else _reseeded(request, i)) for i in range(n)]
            sub = into or Submission([], asyncio.Queue(), 0)
            sub.rids += rids
            sub.open.update(rids)
            sub.prompt_tokens += n * len(request.prompt)
            for rid in rids:
                self.subs[rid] = (sub, loop)
        self.metrics.requests_started(n, len(request.prompt))
        self._wake.set()
        return sub

    def cancel(self, sub: Submission, rid: int | None = None) -> None:
        """Stop one of the submission's requests (`rid`), or all that are still running."""
        for r in ([rid] if rid is not None else list(sub.open)):
            if r in self.subs:
                self.engine.cancel(r)
        self._wake.set()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                outs = self.engine.step()
            except Exception as e:                 # a bug or an out-of-memory: fail what is in flight, go on
                self._fail_all(e)
                continue
            self.metrics.step(time.perf_counter() - t0, self.engine)
            self._route(outs)

    def _route(self, outs: list[Output]) -> None:
        by_rid: dict[int, list] = defaultdict(list)
        for o in outs:
            by_rid[o.request].append(o)
        for rid, items in by_rid.items():
            with self._lock:
                entry = self.subs.get(rid)
                if entry is None:
                    continue
                if items[-1].finished:
                    del self.subs[rid]
            sub, loop = entry
            self.metrics.outputs(sub, items)
            loop.call_soon_threadsafe(_put_all, sub.queue, items)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            entries, self.subs = list(self.subs.items()), {}
        for rid, (sub, loop) in entries:
            self.engine.cancel(rid)
            loop.call_soon_threadsafe(_put_all, sub.queue, [error])
        self.metrics.failed(len(entries))


def _put_all(queue: asyncio.Queue, items: list) -> None:
    for x in items:
        queue.put_nowait(x)


def _reseeded(request: Request, i: int) -> Request:
    """The i-th of n choices: a different seed (or none), so sampled choices differ."""
    from dataclasses import replace
    s = request.sampling
    return replace(request, sampling=replace(s, seed=None if s.seed is None else s.seed + i))
