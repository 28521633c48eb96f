"""Memory bandwidth of this machine, measured the way decoding uses memory: big sequential reads.

Decoding one token reads every LLM weight once, so tokens/s <= bandwidth / bytes per token.
We time `np.copyto` of a buffer far larger than any CPU cache, split across `threads` threads
(numpy releases the GIL while copying), and count read + write bytes. Median of `runs`.
"""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def measure(size_mb: int = 512, runs: int = 7, threads: int = 0) -> dict:
    threads = threads or os.cpu_count() or 1
    n = size_mb * 2**20 // 8
    src = np.ones(n, np.float64)  # touched: no page faults inside the timed region
    dst = np.zeros(n, np.float64)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    parts = [(src[a:b], dst[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    samples = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(runs + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))
            samples.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    samples = samples[1:]
    return {"gb_s": round(statistics.median(samples), 2), "min_gb_s": round(min(samples), 2),
            "max_gb_s": round(max(samples), 2), "runs": [round(s, 2) for s in samples], "threads": threads,
            "buffer_mb": size_mb, "method": "np.copyto, read + write bytes counted"}
