"""One `Engine` driven by several threads at once, each seeing only its own requests.

    shared = SharedEngine(engine)
    def worker():
        view = shared.view()                 # has the Engine's add / cancel / has_work / step
        agent = Agent(view, tok, ...)        # code written for a whole Engine runs unchanged on a view
    threads = [threading.Thread(target=worker) for _ in range(8)]

Code that drives an engine itself (`glmkit.chat.agent.Agent`: add a request, call `step()` until it is
finished, ignore other requests' outputs) cannot share one `Engine` between threads: `Engine.step` has
a single caller, and each caller would drop the outputs of the others. A view fixes both: `view.step()`
returns the outputs of this view's requests that are waiting, and only when there are none does it step
the engine (under one lock), keeping every other view's outputs for that view. Each engine step is still
one batched forward over every running request of every thread, which is the point: episodes of
different conversations decode together (continuous batching) while each thread runs its own loop, its
tools included, at its own pace.

A view's `has_work()` is true while one of its requests is unfinished or has outputs not yet returned.
Outputs of a request whose view no longer waits for it (a cancelled one, or any request added to the
engine directly) are dropped, as `Engine.step` callers drop outputs not theirs.
"""

from __future__ import annotations

import threading

from glmkit.infer.engine import Engine, Output, Request


class SharedEngine:
    """`engine` shared by the threads that each take a `view()`; see the module docstring."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._views: dict[int, EngineView] = {}      # unfinished request id -> the view that added it

    def view(self) -> EngineView:
        return EngineView(self)

    def _step_for(self, view: EngineView) -> list[Output]:
        with self._lock:
            if not view._ready and view._live:
                for out in self.engine.step():
                    owner = self._views.get(out.request)
                    if owner is None:
                        continue
                    owner._ready.append(out)
                    if out.finished is not None:
                        del self._views[out.request]
                        owner._live.discard(out.request)
            outs, view._ready = view._ready, []
        return outs

    def _add(self, view: EngineView, req: Request) -> int:
        with self._lock:
            rid = self.engine.add(req)
            self._views[rid] = view
            view._live.add(rid)
        return rid


class EngineView:
    """The `Engine` API (add, cancel, has_work, step) over a `SharedEngine`, for one thread."""

    def __init__(self, shared: SharedEngine):
        self.shared = shared
        self._live: set[int] = set()          # this view's unfinished requests
        self._ready: list[Output] = []        # their outputs not yet returned by `step`

    @property
    def engine(self) -> Engine:
        return self.shared.engine

    def add(self, req: Request) -> int:
        return self.shared._add(self, req)

    def cancel(self, rid: int) -> None:
        self.shared.engine.cancel(rid)

    def has_work(self) -> bool:
        return bool(self._live or self._ready)

    def step(self) -> list[Output]:
        return self.shared._step_for(self)
