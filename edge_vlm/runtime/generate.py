"""The embedding splice and the decode loop, written once for every backend.

A backend is an `LLMSession`: it tokenizes, evaluates token ids or float embeddings at the
next positions of one sequence, and returns the logits of the last position. `generate`
builds [text before][image embeddings][text after], then samples, detokenizes and stops on
end-of-generation tokens or stop strings (matched on text, never on tokenizer-specific ids).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from edge_vlm.errors import ContextOverflow, EmbeddingSizeMismatch
from edge_vlm.manifest import PromptSpec
from edge_vlm.runtime.sampling import Sampler, SamplingConfig


class LLMSession(Protocol):
    n_ctx: int
    n_embd: int

    def tokenize(self, text: str, add_bos: bool) -> list[int]: ...
    def reset(self) -> None: ...
    def eval_tokens(self, ids: list[int]) -> None: ...
    def eval_embeds(self, embeds: np.ndarray) -> None: ...
    def logits(self) -> np.ndarray: ...
    def is_eog(self, token: int) -> bool: ...
    def detokenize(self, ids: list[int]) -> str: ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    image_tokens: int = 0
    generated_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prefill_end: float | None = None  # perf_counter() when the prompt + image were evaluated
    first_token: float | None = None  # perf_counter() when the first token was sampled
    end: float | None = None


def build_prompt(llm: LLMSession, prompt: PromptSpec, user_text: str) -> tuple[list[int], list[int]]:
    before, after = prompt.render(user_text)
    return llm.tokenize(before, prompt.add_bos), llm.tokenize(after, False)


def prefill(llm: LLMSession, prompt: PromptSpec, user_text: str, image_embeds: np.ndarray,
            max_tokens: int, stats: GenerationStats) -> None:
    """Reset the session and evaluate [before][image][after]; checks sizes before touching the LLM."""
    image_embeds = np.asarray(image_embeds, dtype=np.float32)
    if image_embeds.ndim != 2 or image_embeds.shape[1] != llm.n_embd:
        raise EmbeddingSizeMismatch(
            f"image embeddings have shape {tuple(image_embeds.shape)} but the LLM expects "
            f"[n_tokens, {llm.n_embd}]: the vision model and the LLM come from different exports")
    from edge_vlm import limits

    pre, post = build_prompt(llm, prompt, limits.prompt_text(user_text))
    needed = len(pre) + len(image_embeds) + len(post) + max_tokens
    if needed > llm.n_ctx:
        raise ContextOverflow(needed, llm.n_ctx)
    stats.prompt_tokens = len(pre) + len(post) + len(image_embeds)
    stats.image_tokens = len(image_embeds)
    llm.reset()
    if pre:
        llm.eval_tokens(pre)
    llm.eval_embeds(np.ascontiguousarray(image_embeds))
    if post:
        llm.eval_tokens(post)


CLEANUP_HOLD = 5  # runtime/tokenizer.py's clean-up decides a space from at most the 3 characters after it


class _StopText:
    """Turns a growing decoded string into safe-to-emit pieces, cutting at stop strings."""

    def __init__(self, stops: list[str], hold: int = 0):
        self.stops = [s for s in stops if s]
        self.emitted = 0
        self.stopped = False
        # text whose last characters may still change (clean-up of spaces: " 's" -> "'s" once the next
        # characters are known) holds back that many characters until the end
        self.hold = hold

    def feed(self, text: str, final: bool = False) -> str:
        for s in self.stops:
            i = text.find(s)
            if i != -1:
                self.stopped = True
                text = text[:i]
                final = True
        safe = len(text)
        if not final:
            safe = max(0, safe - self.hold)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                safe = min(safe, len(text.rstrip("\ufffd")))
            for s in self.stops:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece


def generate(llm: LLMSession, prompt: PromptSpec, user_text: str, image_embeds: np.ndarray,
             sampling: SamplingConfig, stats: GenerationStats | None = None,
             ignore_eos: bool = False) -> Iterator[str]:
    """Yield text pieces of the answer as they are decoded."""
    stats = stats if stats is not None else GenerationStats()
    prefill(llm, prompt, user_text, image_embeds, sampling.max_tokens, stats)
    stats.prefill_end = time.perf_counter()
    sample = Sampler(sampling)
    # a tokenizer that cleans up spaces (Phi-2's) rewrites the last few characters as more arrive
    stopper = _StopText(prompt.stop if not ignore_eos else [], hold=CLEANUP_HOLD if getattr(
        llm, "clean_up_spaces", False) else 0)
    out: list[int] = []
    stats.stop_reason = "max_tokens"
    for i in range(sampling.max_tokens):
        tok = sample(llm.logits())
        if stats.first_token is None:
            stats.first_token = time.perf_counter()
        if llm.is_eog(tok) and not ignore_eos:
            stats.stop_reason = "eos"
            break
        out.append(tok)
        stats.tokens = out
        stats.generated_tokens = len(out)
        piece = stopper.feed(llm.detokenize(out))
        if piece:
            yield piece
        if stopper.stopped:
            stats.stop_reason = "stop_string"
            stats.end = time.perf_counter()
            return
        if i + 1 < sampling.max_tokens:
            llm.eval_tokens([tok])
    stats.end = time.perf_counter()
    tail = stopper.feed(llm.detokenize(out), final=True)
    if tail:
        yield tail
