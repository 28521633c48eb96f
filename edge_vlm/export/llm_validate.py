"""Checks every LLM backend's export passes against the torch reference, on the same inputs.

Each backend owns its floors (how much agreement its quantization must keep); the checks
themselves are written once here, over two `LLMSession`s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_vlm.errors import ExportValidationError

TOKENIZER_PROBES = ("Hello, world!", "  two  spaces\tand a tab\n", "3.14159 + 42 = 45.14159",
                    "café naïve 日本語 emoji 🙂", "<|im_start|>user\nwhat?<|im_end|>\n",
                    "It 's a dog , isn't it ? I 'm sure .")


def check_tokenizer(ref, test, prompt, what: str = "bundle tokenizer", sentencepiece: bool = False) -> dict:
    """The bundle's tokenizer must give the reference's ids for the template and tricky strings, and
    decode those ids to the reference's text (stop strings are matched on that text).

    `sentencepiece`: LLaMA vocabularies. There SentencePiece itself (what upstream tokenized with) and
    llama.cpp put the dummy-prefix space before a fragment that already starts with whitespace, while
    transformers' fast Llama tokenizer does not: probes starting with whitespace are skipped (the
    template's own fragments are always checked, so a template that hits the difference still fails)."""
    before, after = prompt.render("what color is the shape?")
    probes = tuple(p for p in TOKENIZER_PROBES if not (sentencepiece and p[:1].isspace()))
    cases = (before, after) + probes
    bad = [c for c in cases if ref.tokenize(c, False) != test.tokenize(c, False)
           or ref.detokenize(ref.tokenize(c, False)) != test.detokenize(ref.tokenize(c, False))]
    if bad:
        raise ExportValidationError(what, {repr(c)[:40]: float("nan") for c in bad},
                                    "identical token ids (is tokenizer_pre right for this tokenizer?)")
    return {"strings": len(cases), "identical_ids": True, "identical_text": True,
            **({"skipped_leading_space_probes": len(TOKENIZER_PROBES) - len(probes)} if sentencepiece else {})}


@dataclass
class ReferenceTrace:
    """The torch reference on the validation input, recorded once: its greedy continuation (EOS
    ignored) and its logits at every step. Recording it lets a backend free the torch LLM before
    loading its own copy (a 2.7B model does not fit twice in 24 GB)."""

    tokens: list
    logits: np.ndarray  # [n, n_vocab]


def reference_trace(ref, prompt, user_text: str, image_embeds: np.ndarray, n: int = 16) -> ReferenceTrace:
    from edge_vlm.runtime.generate import GenerationStats, prefill

    prefill(ref, prompt, user_text, image_embeds, n, GenerationStats())
    tokens, logits = [], []
    for i in range(n):
        logits.append(ref.logits().astype(np.float32))
        tokens.append(int(np.argmax(logits[-1])))
        if i + 1 < n:
            ref.eval_tokens([tokens[-1]])
    return ReferenceTrace(tokens, np.stack(logits))


def teacher_forced_agreement(trace: ReferenceTrace, test, prompt, user_text: str, image_embeds: np.ndarray) -> dict:
    """Agreement of `test` with the reference along the reference's own greedy continuation: top-1 (same
    argmax) and top-5 (the reference's argmax among `test`'s five best), plus the largest logit difference."""
    from edge_vlm.runtime.generate import GenerationStats, prefill

    n = len(trace.tokens)
    prefill(test, prompt, user_text, image_embeds, n, GenerationStats())
    agree, top5, first_diff, max_diff, kl = 0, 0, None, 0.0, 0.0
    for i, tok in enumerate(trace.tokens):
        lr, lt = trace.logits[i], test.logits()
        kl += kl_divergence(lr, lt)
        d = float(np.max(np.abs(lr - lt)))
        first_diff = d if first_diff is None else first_diff
        max_diff = max(max_diff, d)
        agree += int(tok == int(np.argmax(lt)))
        top5 += int(tok in np.argpartition(-lt, 5)[:5])
        if i + 1 < n:
            test.eval_tokens([tok])
    return {"tokens": n, "top1_agreement": agree / n, "top5_agreement": top5 / n, "first_logits_max_abs_diff": first_diff,
            "logits_max_abs_diff": max_diff, "mean_kl": kl / n}


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """KL(reference || test) of the two next-token distributions, in nats (float64)."""
    a = ref_logits.astype(np.float64)
    b = test_logits.astype(np.float64)
    la = a - a.max() - np.log(np.exp(a - a.max()).sum())
    lb = b - b.max() - np.log(np.exp(b - b.max()).sum())
    return float(max(0.0, np.sum(np.exp(la) * (la - lb))))


# The 4-bit floor every backend without a better-founded one uses. Chance is 5/n_vocab (~1e-4);
# a broken layout scores ~0. Tiny random test models keep only 0.3-0.7 top-5 at 4 bits (near-tied
# logits over 49k tokens), the built-in model 0.9+, so the floor sits well below the first and far
# above chance.
FLOOR_4BIT = ("top5_agreement", 0.25)


def check_agreement(what: str, result: dict, floor: float, metric: str = "top1_agreement") -> None:
    """`floor` catches broken exports (a wrong layout scores ~0), not quality: `edge-vlm eval` measures that."""
    result["min_agreement"] = {metric: floor}
    if result[metric] < floor:
        raise ExportValidationError(what, {metric: result[metric]}, f"a teacher-forced {metric} floor of {floor}")


def check_logits(what: str, result: dict, atol: float) -> None:
    """For unquantized exports: every position's logits within `atol` of torch (so greedy tokens match)."""
    result["logits_atol"] = atol
    if result["top1_agreement"] < 1.0 or result["logits_max_abs_diff"] > atol:
        raise ExportValidationError(what, {"logits": result["logits_max_abs_diff"],
                                           "top1_disagreement": 1 - result["top1_agreement"]},
                                    f"atol {atol} with identical greedy tokens")


def validate_llm(ctx, session, what: str, floor: tuple[str, float] | None, tokenizer: str | None = None,
                 sentencepiece: bool = False):
    """Run a backend's session against the torch reference on the export's real image, close it,
    and enforce `floor` = (metric, value). Returns (tokenizer check or None, agreement)."""
    try:
        tok = (check_tokenizer(ctx.ref_llm, session, ctx.src.prompt, tokenizer, sentencepiece) if tokenizer
               else None)
        agreement = teacher_forced_agreement(ctx.reference_trace(), session, ctx.src.prompt, ctx.validation_prompt,
                                             ctx.image_embeds)
    finally:
        session.close()
    override = getattr(ctx.cfg, "min_agreement", None)
    if floor and override is not None:
        agreement["floor_overridden"] = {"metric": floor[0], "backend_floor": floor[1], "used": override}
        floor = (floor[0], override)
    if floor:
        check_agreement(what, agreement, floor[1], floor[0])
    return tok, agreement
