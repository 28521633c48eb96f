"""Reading checkpoint files safely and checking their keys strictly.

Pickled torch files load with `weights_only=True`; a file that needs more (arbitrary objects,
i.e. code execution on load) is refused unless the user passes the explicit trust flag.
Key checks name every missing and unexpected key: upstream loads with `strict=False`, which is
how MiniGPT-v2 users with the wrong peft version silently got garbage (families.md §1.7).
"""
from __future__ import annotations

import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_vlm.errors import CheckpointMismatch, SourceError

TRUST_FLAG = "--trust-checkpoint"


def load_torch_file(path: Path, what: str, trust: bool = False) -> dict:
    """A `.pth`/`.bin` pickle as a dict, loaded with weights_only=True unless `trust`. Anything torch
    raises on a file that is not a checkpoint (a text file gives IndexError or KeyError from inside
    the unpickler) is a SourceError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{what}: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust, mmap=_zip_format(path))
    except pickle.UnpicklingError as e:
        if not trust and _needs_unsafe(str(e)):
            raise SourceError(
                f"{what}: {path} needs unsafe unpickling (it holds objects beyond tensors and plain containers: "
                f"{_refusal(str(e))}). Loading it could run code from the file. If you trust its "
                f"origin, pass {TRUST_FLAG}; better, re-save it as tensors only") from e
        raise SourceError(_unreadable(what, path, e)) from e
    except Exception as e:  # noqa: BLE001 (a damaged file reaches torch's internals in many ways)
        raise SourceError(_unreadable(what, path, e)) from e
    if trust:
        print(f"warning: {path} was unpickled without weights_only ({TRUST_FLAG})", file=sys.stderr)
    if not isinstance(obj, dict):
        raise SourceError(f"{what}: {path} holds a {type(obj).__name__}, not a state dict")
    return obj


# torch's weights-only unpickler refuses a *valid* pickle that needs classes or functions with these
# words; other refusals ("Unsupported operand 104") mean the bytes are no pickle at all
UNSAFE_MARKERS = ("Unsupported global", "unsupported GLOBAL", "allowlisted", "unrecognized function")


def _needs_unsafe(message: str) -> bool:
    return any(m in message for m in UNSAFE_MARKERS)


def _refusal(message: str) -> str:
    """The line of torch's long weights-only message that names what was refused."""
    line = next((x for x in message.splitlines() if _needs_unsafe(x)), message.splitlines()[0] if message else "")
    return line.strip().removeprefix("WeightsUnpickler error: ")[:160]


def _unreadable(what: str, path: Path, e: Exception) -> str:
    detail = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    return (f"{what}: {path} is not a readable torch checkpoint (truncated or damaged, or not a checkpoint at all: "
            f"{type(e).__name__}{': ' + detail[:200] if detail else ''})")


def _zip_format(path: Path) -> bool:
    """torch's zip format can be memory-mapped (a 2 GB ViT is then read on demand, not copied)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_weights_file(path: Path, what: str, trust: bool = False) -> dict:
    """safetensors or torch pickle, by suffix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise SourceError(f"{what}: {path} does not exist")
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises untyped errors for damaged files
            detail = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
            raise SourceError(f"{what}: {path} is not a readable safetensors file ({detail[:200]})") from e
    return load_torch_file(path, what, trust)


def model_state(ckpt: dict, path: Path, what: str) -> dict:
    """The state dict inside a training checkpoint (`{'model': ..., 'optimizer': ...}`) or a flat one:
    names to tensors, checked here so that a file holding other values fails now, by name, and not
    as a TypeError deep in a loader."""
    import torch

    if "model" in ckpt:
        state, where = ckpt["model"], f"{path}['model']"
        if not isinstance(state, dict):
            raise SourceError(f"{what}: {where} is a {type(state).__name__}, not a state dict")
    else:
        state, where = ckpt, str(path)
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SourceError(f"{what}: {path} is neither a state dict nor a checkpoint with a 'model' entry "
                              f"(top-level keys: {', '.join(map(str, list(ckpt)[:8]))})")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad:
        raise SourceError(f"{what}: {where} is not a state dict: {str(bad[0])[:80]!r} holds a {type(bad[1]).__name__}, "
                          "not a tensor (is it the right file?)")
    return state


@dataclass(frozen=True)
class Rename:
    """One row of a key-rename table: `src` names in the upstream file, `dst` in our module.
    `{i}` expands over `per` ("layers", or "cross" for cross-attention layers only)."""

    src: str
    dst: str
    per: str = ""


@dataclass
class KeyReport:
    """What a strict load consumed, and what it ignored on purpose (with the reason)."""

    used: set = field(default_factory=set)
    ignored: dict = field(default_factory=dict)  # key -> reason

    def summary(self) -> dict:
        reasons = {}
        for k, why in self.ignored.items():
            reasons.setdefault(why, []).append(k)
        return {"used": len(self.used), "ignored": {why: len(ks) for why, ks in reasons.items()}}


def rename(state: dict, table, indices: dict, what: str, prefix: str = "") -> tuple[dict, set]:
    """Apply a rename table. `indices` maps each `per` value to the layer indices it expands to.
    Returns (renamed state, source keys used); a source key the table needs but the file lacks
    is collected and reported by name."""
    out, used, missing = {}, set(), []
    for row in table:
        for i in indices.get(row.per, [None]) if row.per else [None]:
            src = prefix + (row.src.format(i=i) if i is not None else row.src)
            dst = row.dst.format(i=i) if i is not None else row.dst
            if src not in state:
                missing.append(src)
                continue
            out[dst] = state[src]
            used.add(src)
    if missing:
        raise CheckpointMismatch(what, missing=missing, hint="the file does not hold what this family needs: "
                                 "is it the right file for this argument and family?")
    return out, used


def check_unexpected(state: dict, used: set, ignore: dict, what: str, report: KeyReport | None = None) -> None:
    """Every key is used or matches an `ignore` pattern (regex -> reason); anything else is an error."""
    unexpected = []
    for k in state:
        if k in used:
            continue
        why = next((reason for pat, reason in ignore.items() if re.fullmatch(pat, k)), None)
        if why is None:
            unexpected.append(k)
        elif report is not None:
            report.ignored[k] = why
    if unexpected:
        raise CheckpointMismatch(what, unexpected=sorted(unexpected), hint=(
            "edge-vlm refuses keys it would silently drop (upstream's strict=False load is how wrong files gave "
            "garbage): check the file and --family"))
    if report is not None:
        report.used |= used


def check_shapes(module, state: dict, what: str) -> None:
    own = module.state_dict()
    bad = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointMismatch(what, hint="shape mismatch: " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}" for k in bad[:6]))


def load_into(module, state: dict, what: str, allowed_missing: tuple[str, ...] = ()) -> None:
    """Strict load of an already-renamed state (float-cast to the module's dtype); only keys
    matching `allowed_missing` regexes (values that live in no file) may stay at their init."""
    own = module.state_dict()
    check_shapes(module, state, what)
    missing = [k for k in own if k not in state and not any(re.fullmatch(p, k) for p in allowed_missing)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointMismatch(what, missing, unexpected)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
