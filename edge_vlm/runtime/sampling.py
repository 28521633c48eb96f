"""Token choice from a logits vector. Shared by every LLM backend and the torch reference."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (the default: reproducible and what the accuracy numbers use)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0  # -1: a fresh random seed per request (as llama.cpp's -1)

    def __post_init__(self):
        if not _number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise BadInput(f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE}, got {self.temperature}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise BadInput(f"top-p must be in (0, 1], got {self.top_p}")
        if not _integer(self.max_tokens) or self.max_tokens < 1:
            raise BadInput(f"max-tokens must be a whole number >= 1, got {self.max_tokens}")
        if not _integer(self.seed) or not -1 <= self.seed < 2 ** 63:
            raise BadInput(f"seed must be a whole number from 0 to 2^63-1, or -1 for a random seed; got {self.seed}")


MAX_TEMPERATURE = 100.0  # beyond that every distribution is uniform to float precision
GREEDY_BELOW = 1e-4  # smaller temperatures only overflow exp(); they mean greedy


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(None if cfg.seed == -1 else cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))
        z = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
        if not np.isfinite(z).any():  # a model that produced no usable logit: greedy on what it gave
            return int(np.argmax(logits))
        z = z / self.cfg.temperature
        p = np.exp(z - z[np.isfinite(z)].max())
        p /= p.sum()
        if self.cfg.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.cfg.top_p  # always keeps the top token
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0)
            p /= p.sum()
        return int(self.rng.choice(len(p), p=p))
