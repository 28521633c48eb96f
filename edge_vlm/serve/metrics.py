"""Counters, gauges and histograms for /metrics, in Prometheus' text format (0.0.4). Thread-safe:
the engine thread and the HTTP handlers both record."""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds
OUTCOMES = ("ok", "bad_request", "unauthorized", "too_large", "rejected", "cancelled", "error")


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {cum}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {o: 0 for o in OUTCOMES}
        self.prompt_tokens = self.generated_tokens = 0
        self.image_cache_hits = self.image_cache_misses = 0
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.queue_depth = self.active = 0  # set by the engine

    def outcome(self, name: str) -> None:
        with self._lock:
            self.requests[name] += 1

    def finished(self, prompt_tokens: int, generated: int, ttft_s: float | None, e2e_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.e2e.observe(e2e_s)

    def cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.image_cache_hits += 1
            else:
                self.image_cache_misses += 1

    def text(self) -> str:
        with self._lock:
            lines = ["# HELP edge_vlm_requests_total Chat completion requests by outcome.",
                     "# TYPE edge_vlm_requests_total counter"]
            lines += [f'edge_vlm_requests_total{{outcome="{o}"}} {n}' for o, n in self.requests.items()]
            for name, help_, kind, v in (
                    ("edge_vlm_queue_depth", "Requests waiting for a slot.", "gauge", self.queue_depth),
                    ("edge_vlm_active_requests", "Requests being decoded.", "gauge", self.active),
                    ("edge_vlm_prompt_tokens_total", "Prompt positions evaluated (text and image).", "counter",
                     self.prompt_tokens),
                    ("edge_vlm_generated_tokens_total", "Tokens generated.", "counter", self.generated_tokens),
                    ("edge_vlm_image_cache_hits_total", "Images whose embeddings came from the cache.", "counter",
                     self.image_cache_hits),
                    ("edge_vlm_image_cache_misses_total", "Images run through the vision model.", "counter",
                     self.image_cache_misses)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
            for name, help_, h in (("edge_vlm_time_to_first_token_seconds", "Arrival to first token.", self.ttft),
                                   ("edge_vlm_request_duration_seconds", "Arrival to last token.", self.e2e)):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
        return "\n".join(lines) + "\n"
