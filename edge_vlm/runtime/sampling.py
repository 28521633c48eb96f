"""Token choice from a logits vector. Shared by every LLM backend and the torch reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (the default: reproducible and what the accuracy numbers use)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise BadInput(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise BadInput(f"max-tokens must be >= 1, got {self.max_tokens}")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.cfg.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.cfg.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.cfg.top_p  # always keeps the top token
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0)
            p /= p.sum()
        return int(self.rng.choice(len(p), p=p))
