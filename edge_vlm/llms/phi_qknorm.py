"""TinyGPT-V's Phi-2 variant, as a transformers model of ours (model_type "tinygpt_v_phi").

TinyGPT-V overwrote transformers 4.36's `modeling_phi.py` (families.md §2.2). Against stock
Phi-2 the decoder layer has:
  - a fused `self_attn.query_key_value` Linear(H, 3H) whose output rows are grouped per head
    as [q, k, v] (the old-format Phi-2 weights), and `self_attn.dense` Linear(H, H);
  - per-head QK-LayerNorm: `self_attn.q_layernorm` / `k_layernorm` = LayerNorm(head_dim), applied
    to q and k before RoPE;
  - a post-attention RMSNorm `post_layernorm` (eps 1e-6) on the attention output;
  - Phi's parallel block: h = x + post_layernorm(attn(ln(x))) + mlp(ln(x)), ln = `input_layernorm`;
  - partial rotary embeddings (rotate-half on the first `partial_rotary_factor * head_dim` dims),
    gelu_new MLP `fc1`/`fc2`, `model.final_layernorm`, and `lm_head` with a bias.
Parameter names follow the old-format Phi-2 layout that TinyGPT-V's Phi-2 weights and stage
checkpoints use (without their PEFT prefixes).

llama.cpp has no such architecture; the onnx and bnb backends take it. The KV cache is any transformers `Cache` (`update(k, v, layer_idx)`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyGPTVPhiConfig(PretrainedConfig):
    model_type = "tinygpt_v_phi"

    def __init__(self, vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                 num_attention_heads=32, partial_rotary_factor=0.4, rope_theta=10000.0, layer_norm_eps=1e-5,
                 post_layernorm_eps=1e-6, max_position_embeddings=2048, initializer_range=0.02,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.partial_rotary_factor, self.rope_theta = partial_rotary_factor, rope_theta
        self.layer_norm_eps, self.post_layernorm_eps = layer_norm_eps, post_layernorm_eps
        self.max_position_embeddings, self.initializer_range = max_position_embeddings, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary_factor * self.head_dim)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: computed in fp32, weight only."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x, cos, sin, rotary_dim: int):
    """Rotate-half RoPE on the first `rotary_dim` channels; the rest pass through."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = xr[..., : rotary_dim // 2], xr[..., rotary_dim // 2:]
    return torch.cat((xr * cos + torch.cat((-x2, x1), -1) * sin, xp), -1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyGPTVPhiConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim, self.rotary_dim = (
            layer_idx, cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim)
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        b, n, width = x.shape
        q, k, v = self.query_key_value(x).view(b, n, self.n_head, 3, self.head_dim).unbind(3)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, n, head_dim]
        q, k = rotate(q, cos, sin, self.rotary_dim), rotate(k, cos, sin, self.rotary_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores, -1).to(v.dtype) @ v  # softmax in fp32, as Phi
        return self.dense(out.transpose(1, 2).reshape(b, n, width))


class MLP(nn.Module):
    def __init__(self, cfg: TinyGPTVPhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))  # gelu_new


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyGPTVPhiConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.post_layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        h = self.input_layernorm(x)
        return x + self.post_layernorm(self.self_attn(h, cos, sin, mask, cache)) + self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: TinyGPTVPhiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TinyGPTVPhiForCausalLM(PreTrainedModel):
    config_class = TinyGPTVPhiConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: TinyGPTVPhiConfig):
        super().__init__(config)
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _rope(self, position_ids, dtype):
        rd = self.config.rotary_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, rd, 2, device=position_ids.device).float() / rd))
        freqs = position_ids[..., None].float() * inv_freq  # [b, n, rd/2]
        emb = torch.cat((freqs, freqs), -1)[:, None]  # [b, 1, n, rd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        n = x.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=x.device)[None]
        keys = torch.arange(past + n, device=x.device)
        mask = torch.where(keys[None, None, None, :] <= position_ids[:, None, :, None], 0.0, float("-inf"))
        if attention_mask is not None:  # [b, past + n], 0 = padding
            mask = mask + torch.where(attention_mask[:, None, None, :] > 0, 0.0, float("-inf"))
        cos, sin = self._rope(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, past_key_values)
        x = self.model.final_layernorm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(x), past_key_values=past_key_values)


CONFIG_CLASS, MODEL_CLASS = TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM
