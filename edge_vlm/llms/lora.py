"""Low-rank adapters on an LLM's linear layers: trained by `edge-vlm align --lora-rank R`, stored beside the
projection as `lora.safetensors`, and merged into the weights when a source is loaded, so every backend exports
one ordinary LLM (no runtime carries an adapter).

File format: peft's key names, as upstream checkpoints use them (families/lora.py reads both): for each adapted
module `M` (its path in the transformers model, e.g. `model.layers.0.self_attn.q_proj`), `M.lora_A.weight`
[rank, in] and `M.lora_B.weight` [out, rank], with the scale (alpha / rank) already folded into B. Merging adds
B @ A to M's weight.
"""
from __future__ import annotations

import math
from pathlib import Path

from edge_vlm.errors import SourceError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention, where the question meets the image tokens
ALPHA_PER_RANK = 2.0  # alpha = 2 x rank, a common LoRA default


def read(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own untyped errors for damaged files
        raise SourceError(f"LLM adapter {path} is not a readable safetensors file ({e}); retrain or restore it") from e


def combine(first: dict, second: dict) -> dict:
    """One adapter file equal to applying both: where both adapt a layer, their ranks are stacked
    ([A1; A2] and [B1, B2] give B1 A1 + B2 A2)."""
    import torch

    out = dict(first)
    for key, t in second.items():
        if key not in out:
            out[key] = t
        else:
            out[key] = torch.cat([out[key], t], dim=0 if key.endswith("lora_A.weight") else 1).contiguous()
    return out


def merge(llm, path: Path) -> int:
    """Add each adapter's B @ A to its layer's weight; returns the number of layers changed."""
    from edge_vlm.families.lora import merge_lora, split_lora

    pairs, rest, _ = split_lora(read(path))
    if rest or not pairs:
        raise SourceError(f"LLM adapter {path} holds {len(rest)} tensors that are not lora_A/lora_B weights"
                          + (f" ({', '.join(sorted(rest)[:4])})" if rest else "")
                          + ": it is not an edge-vlm adapter; retrain it with `edge-vlm align --lora-rank R`")
    return merge_lora(llm, pairs, sorted(pairs), None, f"LLM adapter {path}")["modules"]


def attach(llm, rank: int, targets=TARGETS) -> dict:
    """Wrap the target linear layers of every decoder layer with trainable low-rank adapters (the rest frozen)."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.scale = base, ALPHA_PER_RANK
            self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the identity

        def forward(self, x):
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    wrapped = {}
    for name, module in list(llm.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            parent, attr = name.rsplit(".", 1)
            w = LoRALinear(module)
            setattr(llm.get_submodule(parent), attr, w)
            wrapped[name] = w
    if not wrapped:
        raise SourceError(f"the LLM has no linear layers named {', '.join(targets)} to adapt")
    return wrapped


def trainable(wrapped: dict) -> list:
    return [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]


def state(wrapped: dict) -> dict:
    """The adapters in the file format (scale folded into B)."""
    out = {}
    for name, w in wrapped.items():
        out[f"{name}.lora_A.weight"] = w.lora_A.detach().contiguous().clone()
        out[f"{name}.lora_B.weight"] = (w.lora_B * w.scale).detach().contiguous().clone()
    return out


def detach(llm, wrapped: dict) -> None:
    """Put the original linear layers back (after training, before the model is used as a plain LLM)."""
    for name, w in wrapped.items():
        parent, attr = name.rsplit(".", 1)
        setattr(llm.get_submodule(parent), attr, w.base)
