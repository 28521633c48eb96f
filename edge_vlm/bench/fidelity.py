"""Fidelity of a bundle to its reference, on the same inputs (pure numpy, no runtime imports).

- greedy agreement: free-running greedy decoding of both; the fraction of the reference's N
  tokens the bundle reproduces at the same position, and where they first differ.
- KL: both run teacher-forced on the reference's tokens; KL(reference || bundle) of the
  next-token distributions, averaged over positions (nats).
- vision cosine: cosine similarity of the bundle's and the reference's image embeddings per
  image token; mean and min.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_position(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """[N, V] logits each -> [N] KL(ref || test). A vocabulary padded on one side is cut to the shared rows."""
    v = min(ref_logits.shape[-1], test_logits.shape[-1])
    p, q = log_softmax(ref_logits[..., :v]), log_softmax(test_logits[..., :v])
    return (np.exp(p) * (p - q)).sum(axis=-1)


def token_cosines(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """[T, D] embeddings each -> [T] cosine similarities."""
    a, b = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image embeddings differ in shape: reference {a.shape}, bundle {b.shape}")
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(den, 1e-30)


def greedy_agreement(ref_tokens: list[int], test_tokens: list[int]) -> tuple[float, int]:
    """(fraction of positions equal, first differing position or len(ref) if none)."""
    n = len(ref_tokens)
    same = [i < len(test_tokens) and test_tokens[i] == t for i, t in enumerate(ref_tokens)]
    first = same.index(False) if False in same else n
    return (sum(same) / n if n else 1.0), first


def compare(cases: list[dict]) -> dict:
    """`cases`: per input, {ref_tokens, test_tokens, ref_logits, test_logits, ref_embeds, test_embeds}."""
    agree, firsts, kls, top1, cos = [], [], [], [], []
    for c in cases:
        a, f = greedy_agreement(c["ref_tokens"], c["test_tokens"])
        agree.append(a)
        firsts.append(f)
        kls.append(kl_per_position(c["ref_logits"], c["test_logits"]))
        v = min(c["ref_logits"].shape[-1], c["test_logits"].shape[-1])
        top1.append(c["ref_logits"][:, :v].argmax(-1) == c["test_logits"][:, :v].argmax(-1))
        cos.append(token_cosines(c["ref_embeds"], c["test_embeds"]))
    kl = np.concatenate(kls)
    cosines = np.concatenate(cos)
    return {"cases": len(cases), "tokens_per_case": len(cases[0]["ref_tokens"]) if cases else 0,
            "greedy_agreement": float(np.mean(agree)), "first_divergence": firsts,
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "teacher_forced_top1": float(np.concatenate(top1).mean()),
            "vision_cosine_mean": float(cosines.mean()), "vision_cosine_min": float(cosines.min())}
