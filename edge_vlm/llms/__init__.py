"""Decoder architectures edge-vlm implements itself, for LLMs transformers does not ship.

ARCHITECTURES maps an HF `model_type` to the module defining its config and causal-LM classes.
`register_architectures()` makes them loadable by `AutoModelForCausalLM.from_pretrained` (so
bitsandbytes and GPTQModel checkpoints of them save and reload like any transformers model).
"""
from __future__ import annotations

import importlib

ARCHITECTURES = {
    # TinyGPT-V's Phi-2 variant: fused query_key_value, per-head QK-LayerNorm before RoPE,
    # post-attention RMSNorm, parallel block, partial rotary. llama.cpp cannot express it.
    "tinygpt_v_phi": "edge_vlm.llms.phi_qknorm",
}

_registered = False


def register_architectures() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type, module in ARCHITECTURES.items():
        m = importlib.import_module(module)
        AutoConfig.register(model_type, m.CONFIG_CLASS)
        AutoModelForCausalLM.register(m.CONFIG_CLASS, m.MODEL_CLASS)
    _registered = True
