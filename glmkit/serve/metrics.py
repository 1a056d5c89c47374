"""Server metrics in the Prometheus text format (`GET /metrics`), kept by hand: a few counters,
gauges and one histogram need no client library.

- glmkit_requests_total{endpoint, status}: answered HTTP requests;
- glmkit_prompt_tokens_total, glmkit_generation_tokens_total: tokens read and produced;
- glmkit_requests_running, glmkit_requests_waiting: the engine's rows in use and its queue;
- glmkit_time_to_first_token_seconds: histogram from submission to the first generated token;
- glmkit_generation_tokens_per_second: tokens produced over the last 10 seconds, per second;
- glmkit_engine_step_seconds_total, glmkit_engine_steps_total, glmkit_request_failures_total.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.http = Counter()                      # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated = 0
        self.started = 0
        self.failures = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.running = 0
        self.waiting = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.recent: deque[tuple[float, int]] = deque()     # (time, tokens) of recent steps
        self._seen_first: set[int] = set()

    def http_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, status)] += 1

    def requests_started(self, n: int, prompt_tokens: int) -> None:
        with self._lock:
            self.started += n
            self.prompt_tokens += n * prompt_tokens

    def failed(self, n: int) -> None:
        with self._lock:
            self.failures += n

    def step(self, seconds: float, engine) -> None:
        with self._lock:
            self.steps += 1
            self.step_seconds += seconds
            self.running, self.waiting = len(engine.running), len(engine.waiting)

    def outputs(self, sub, items) -> None:
        """Called by the engine thread with one request's outputs of one step."""
        n = sum(o.token is not None for o in items)
        t = time.perf_counter()
        with self._lock:
            rid = items[0].request
            if n and rid not in self._seen_first:
                self._seen_first.add(rid)
                self._observe_ttft(t - sub.submitted)
            if items[-1].finished:
                self._seen_first.discard(rid)
            self.generated += n
            self.recent.append((t, n))
            while self.recent and self.recent[0][0] < t - WINDOW_S:
                self.recent.popleft()

    def _observe_ttft(self, s: float) -> None:
        i = next((i for i, b in enumerate(TTFT_BUCKETS) if s <= b), len(TTFT_BUCKETS))
        self.ttft[i] += 1
        self.ttft_sum += s
        self.ttft_count += 1

    def tokens_per_second(self) -> float:
        t = time.perf_counter()
        with self._lock:
            n = sum(k for when, k in self.recent if when >= t - WINDOW_S)
        return n / WINDOW_S

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            out = ["# HELP glmkit_requests_total HTTP requests answered, by endpoint and status.",
                   "# TYPE glmkit_requests_total counter"]
            out += [f'glmkit_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.http.items())]
            out += _metric("prompt_tokens_total", "counter", "Prompt tokens of generation requests.", self.prompt_tokens)
            out += _metric("generation_tokens_total", "counter", "Tokens generated.", self.generated)
            out += _metric("requests_running", "gauge", "Requests holding a KV row.", self.running)
            out += _metric("requests_waiting", "gauge", "Requests waiting for a KV row (the queue).", self.waiting)
            out += _metric("generation_tokens_per_second", "gauge",
                           f"Tokens generated per second over the last {WINDOW_S:g} s.", round(rate, 3))
            out += _metric("engine_steps_total", "counter", "Engine steps run.", self.steps)
            out += _metric("engine_step_seconds_total", "counter", "Time spent in engine steps.",
                           round(self.step_seconds, 6))
            out += _metric("request_failures_total", "counter", "Requests failed by an engine error.", self.failures)
            out += ["# HELP glmkit_time_to_first_token_seconds From submission to the first generated token.",
                    "# TYPE glmkit_time_to_first_token_seconds histogram"]
            cum = 0
            for b, k in zip((*TTFT_BUCKETS, "+Inf"), self.ttft):
                cum += k
                out.append(f'glmkit_time_to_first_token_seconds_bucket{{le="{b}"}} {cum}')
            out += [f"glmkit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                    f"glmkit_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(out) + "\n"


def _metric(name: str, kind: str, help_text: str, value) -> list[str]:
    return [f"# HELP glmkit_{name} {help_text}", f"# TYPE glmkit_{name} {kind}", f"glmkit_{name} {value}"]
