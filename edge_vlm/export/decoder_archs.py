"""What the fused decoder builder needs from each LLM architecture: its dimensions and, layer by layer,
its weights as float32 numpy arrays in the builder's canonical names.

One reader per transformers model_type (ARCHS); each yields one layer at a time, so the builder
holds one layer's fp32 copy at most (the torch model itself may be fp16). A new architecture is a
new reader and, if its block differs, a new block in decoder_graph.BLOCKS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DecoderDims:
    block: str  # decoder_graph.BLOCKS key: "llama" (pre-norm, RMSNorm, SwiGLU) or "phi_qknorm"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    inv_freq: tuple  # RoPE frequencies, rotary_dim / 2 of them
    rope_scale: float  # multiplies cos and sin (transformers' attention_scaling; 1.0 for plain RoPE)
    max_positions: int
    vocab: int
    norm_eps: float
    post_norm_eps: float = 0.0  # phi_qknorm: the RMSNorm on the attention output


def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


def _bias(linear):
    return _np(getattr(linear, "bias", None))


# ---- llama (Llama, Vicuna, SmolLM2: RMSNorm, RoPE rotate-half, SwiGLU) ------------------------------

def llama_dims(model) -> DecoderDims:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rot = model.model.rotary_emb
    inv = rot.inv_freq.detach().float().cpu().numpy()
    return DecoderDims("llama", c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                       getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, 2 * len(inv),
                       tuple(float(x) for x in inv), float(getattr(rot, "attention_scaling", 1.0)),
                       c.max_position_embeddings, c.vocab_size, c.rms_norm_eps)


def llama_layer(model, i: int) -> dict:
    layer = model.model.layers[i]
    a, m = layer.self_attn, layer.mlp
    qkv_b = [_bias(x) for x in (a.q_proj, a.k_proj, a.v_proj)]
    gu_b = [_bias(x) for x in (m.gate_proj, m.up_proj)]
    return {
        "in_norm": _np(layer.input_layernorm.weight),
        "qkv": np.concatenate([_np(x.weight) for x in (a.q_proj, a.k_proj, a.v_proj)]),
        "qkv_bias": None if qkv_b[0] is None else np.concatenate(qkv_b),
        "o": _np(a.o_proj.weight), "o_bias": _bias(a.o_proj),
        "post_norm": _np(layer.post_attention_layernorm.weight),
        "gate_up": np.concatenate([_np(m.gate_proj.weight), _np(m.up_proj.weight)]),
        "gate_up_bias": None if gu_b[0] is None else np.concatenate(gu_b),
        "down": _np(m.down_proj.weight), "down_bias": _bias(m.down_proj),
    }


def llama_head(model) -> dict:
    return {"norm": _np(model.model.norm.weight), "lm_head": _np(model.lm_head.weight),
            "lm_head_bias": _bias(model.lm_head)}


# ---- TinyGPT-V's Phi-2 variant (llms/phi_qknorm.py) --------------------------------------------------

def phi_qknorm_dims(model) -> DecoderDims:
    c = model.config
    rd = c.rotary_dim
    inv = 1.0 / (c.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    return DecoderDims("phi_qknorm", c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                       c.num_attention_heads, c.head_dim, rd, tuple(float(np.float32(x)) for x in inv), 1.0,
                       c.max_position_embeddings, c.vocab_size, c.layer_norm_eps, c.post_layernorm_eps)


def phi_qknorm_layer(model, i: int) -> dict:
    layer = model.model.layers[i]
    a, c = layer.self_attn, model.config
    # the fused query_key_value's rows are grouped per head as [q, k, v]; GroupQueryAttention wants [Q; K; V]
    heads, d = c.num_attention_heads, c.head_dim
    w = _np(a.query_key_value.weight).reshape(heads, 3, d, -1).transpose(1, 0, 2, 3).reshape(3 * heads * d, -1)
    b = _bias(a.query_key_value)
    b = None if b is None else b.reshape(heads, 3, d).transpose(1, 0, 2).reshape(-1)
    return {
        "in_norm": _np(layer.input_layernorm.weight), "in_norm_bias": _np(layer.input_layernorm.bias),
        "qkv": np.ascontiguousarray(w), "qkv_bias": b,
        "q_norm": _np(a.q_layernorm.weight), "q_norm_bias": _np(a.q_layernorm.bias),
        "k_norm": _np(a.k_layernorm.weight), "k_norm_bias": _np(a.k_layernorm.bias),
        "o": _np(a.dense.weight), "o_bias": _bias(a.dense),
        "post_norm": _np(layer.post_layernorm.weight),
        "fc1": _np(layer.mlp.fc1.weight), "fc1_bias": _bias(layer.mlp.fc1),
        "fc2": _np(layer.mlp.fc2.weight), "fc2_bias": _bias(layer.mlp.fc2),
    }


def phi_qknorm_head(model) -> dict:
    n = model.model.final_layernorm
    return {"norm": _np(n.weight), "norm_bias": _np(n.bias), "lm_head": _np(model.lm_head.weight),
            "lm_head_bias": _bias(model.lm_head)}


@dataclass(frozen=True)
class ArchReader:
    dims: object
    layer: object
    head: object


ARCHS = {
    "llama": ArchReader(llama_dims, llama_layer, llama_head),
    "tinygpt_v_phi": ArchReader(phi_qknorm_dims, phi_qknorm_layer, phi_qknorm_head),
}
