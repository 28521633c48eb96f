"""From raw runs to the figures users compare: medians with min/max, ratios to the baseline,
decode speed as a fraction of the bandwidth limit, the planner's error."""
from __future__ import annotations

import statistics

LATENCY = ("preprocess_ms", "vision_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "e2e_ms")
HIGHER_IS_BETTER = {"prefill_tok_s", "decode_tok_s"}


def spread(runs: list[dict]) -> dict:
    out = {}
    for k in LATENCY:
        xs = [r[k] for r in runs if r.get(k) is not None]
        if xs:
            out[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
    return out


def speedups(latency: dict, base: dict) -> dict:
    """How many times faster than the baseline (> 1 = faster), per figure, from the medians."""
    out = {}
    for k in LATENCY:
        if k in latency and k in base and latency[k]["median"] and base[k]["median"]:
            a, b = latency[k]["median"], base[k]["median"]
            out[k] = a / b if k in HIGHER_IS_BETTER else b / a
    return out


def bandwidth_fraction(decode_tok_s: float | None, bytes_per_token: int, gb_s: float) -> dict:
    """Decoding reads every LLM weight once per token: tokens/s <= bandwidth / bytes per token."""
    limit = gb_s * 1e9 / bytes_per_token if bytes_per_token else None
    return {"bytes_per_token": bytes_per_token, "limit_tok_s": limit,
            "fraction": decode_tok_s / limit if decode_tok_s and limit else None}


def planner_error(predicted_mb: float, measured_mb: float) -> float:
    return 100.0 * (predicted_mb - measured_mb) / measured_mb
