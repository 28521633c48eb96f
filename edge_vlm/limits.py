"""Checks of user-given numbers and text that every command shares (threads, context, prompt text).

They run before anything is loaded and raise `BadInput` (exit 2) with what to do instead; the
ranges that depend on a model (its trained context, its image tokens) are checked where the
manifest is read (runtime/pipeline.py).
"""
from __future__ import annotations

import os

from edge_vlm.errors import BadInput

MAX_N_CTX = 1 << 20  # far beyond any model edge-vlm runs; the model's own limit is checked at load
DEFAULT_N_CTX = 2048  # or the model's trained context, if smaller


def cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(n: int | None, flag: str = "--threads") -> tuple[int, str | None]:
    """(threads to use, a note when the request was capped). 0 or None = every core. More threads than
    cores never help: llama.cpp's workers spin while they wait, and oversubscribed they crawl or hang."""
    if n is None or n == 0:
        return cores(), None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise BadInput(f"{flag} {n}: give a number of threads >= 1, or 0 for every core ({cores()} here)")
    if n > cores():
        return cores(), f"note: {flag} {n} capped at this machine's {cores()} cores (more would only contend)"
    return n, None


def n_ctx(n: int | None, flag: str = "--n-ctx") -> int | None:
    """A context size before the model is known: None (the default) or 1..MAX_N_CTX."""
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N_CTX:
        raise BadInput(f"{flag} {n}: give a context size in tokens between 1 and the model's trained context "
                       f"(default: {DEFAULT_N_CTX} or the model's, if smaller)")
    return n


def absolute_path(path, flag: str) -> str:
    """A user-given path made absolute; a symlink loop or an unusable name is BadInput, not a crash."""
    from pathlib import Path

    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise BadInput(f"{flag} {str(path)[:200]}: cannot resolve this path ({e})") from None


def prompt_text(text, what: str = "prompt") -> str:
    """User text must be a str that encodes as UTF-8 (argv bytes that are not UTF-8 arrive as lone
    surrogates, and so do broken strings from the Python API)."""
    if not isinstance(text, str):
        raise BadInput(f"the {what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(f"the {what} is not valid UTF-8 text (at character {e.start}: {ascii(text[e.start:e.end])} "
                       "is not a character; bytes that are not UTF-8 arrive like this): re-type it, or pass it "
                       "from a UTF-8 terminal or locale") from None
    return text
