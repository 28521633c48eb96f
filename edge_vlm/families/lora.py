"""LoRA from MiniGPT-v2 / TinyGPT-V training checkpoints, merged into the LLM's weights at export.

Key names follow peft 0.2.0, which both repos pin (families.md corrections 5):
`<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]; peft >= 0.3 inserts
`.default.` before `weight`, which we accept and report. Merged weight: W + (alpha / r) B @ A
(peft's `scaling`, r read from A's shape).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from edge_vlm.errors import CheckpointMismatch

LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?P<default>\.default)?\.weight")


@dataclass(frozen=True)
class LoraSpec:
    targets: tuple[str, ...]  # the module names peft's `target_modules` matched (q_proj, v_proj, ...)
    alpha: float = 16.0


def split_lora(state: dict) -> tuple[dict, dict, bool]:
    """(module -> {"A": tensor, "B": tensor}, the non-LoRA keys, whether peft>=0.3 names were seen)."""
    pairs, rest, newer = {}, {}, False
    for k, v in state.items():
        m = LORA_KEY.fullmatch(k)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = v
            newer |= bool(m["default"])
        else:
            rest[k] = v
    return pairs, rest, newer


def merge_lora(model, pairs: dict, expected_modules: list[str], alpha: float | None, what: str) -> dict:
    """Merge every pair into `model`'s Linear weights; the pairs must cover exactly `expected_modules`.
    alpha None: B already holds the scale (edge-vlm's own adapters, llms/lora.py)."""
    import torch

    missing = [f"{m}.lora_{ab}.weight" for m in expected_modules for ab in "AB" if ab not in pairs.get(m, {})]
    unexpected = [f"{m}.lora_*.weight" for m in pairs if m not in set(expected_modules)]
    if missing or unexpected:
        raise CheckpointMismatch(what, missing, unexpected, hint="LoRA pairs must cover the family's target "
                                 "modules in every layer (a partial LoRA would silently change the model)")
    ranks = set()
    with torch.no_grad():
        for name in expected_modules:
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                lin = None
            if not isinstance(lin, torch.nn.Linear):
                raise CheckpointMismatch(what, hint=f"{name} is not a linear layer of this model: the LoRA was "
                                         "trained for another model")
            a, b = pairs[name]["A"].float(), pairs[name]["B"].float()
            r = a.shape[0]
            if a.shape != (r, lin.in_features) or b.shape != (lin.out_features, r):
                raise CheckpointMismatch(what, hint=f"{name}: LoRA A {tuple(a.shape)} / B {tuple(b.shape)} do not "
                                         f"fit Linear({lin.in_features} -> {lin.out_features})")
            ranks.add(r)
            lin.weight += ((1.0 if alpha is None else alpha / r) * (b @ a)).to(lin.weight.dtype)
    return {"modules": len(expected_modules), "r": sorted(ranks), "alpha": alpha,
            "scaling": [1.0 if alpha is None else alpha / r for r in sorted(ranks)]}
