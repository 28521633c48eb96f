"""Our TinyGPT-V Phi-2 variant against a plain re-statement of the computation families.md gives,
written here without the module's code (no cache, whole sequence, explicit formulas)."""
import math

import pytest
import torch
import torch.nn.functional as F


def phi_variant_by_hand(sd: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    n_head, width = cfg.num_attention_heads, cfg.hidden_size
    hd = width // n_head
    rd = int(cfg.partial_rotary_factor * hd)
    x = sd["model.embed_tokens.weight"][ids]
    n = len(ids)
    angle = torch.arange(n).float()[:, None] / (cfg.rope_theta ** (torch.arange(0, rd, 2).float() / rd))[None]
    cos, sin = angle.cos(), angle.sin()

    def rope(t):  # rotate-half on the first rd channels of each head
        a, b, rest = t[..., : rd // 2], t[..., rd // 2: rd], t[..., rd:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)

    def ln(t, name):
        return F.layer_norm(t, (t.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], cfg.layer_norm_eps)

    def linear(t, name):
        return t @ sd[name + ".weight"].T + sd[name + ".bias"]

    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ln(x, p + "input_layernorm")
        qkv = linear(h, p + "self_attn.query_key_value").view(n, n_head, 3, hd)  # per head: q, k, v rows
        q = ln(qkv[:, :, 0], p + "self_attn.q_layernorm").transpose(0, 1)
        k = ln(qkv[:, :, 1], p + "self_attn.k_layernorm").transpose(0, 1)
        v = qkv[:, :, 2].transpose(0, 1)
        att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)).masked_fill(causal, float("-inf")).softmax(-1)
        o = linear((att @ v).transpose(0, 1).reshape(n, width), p + "self_attn.dense")
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[p + "post_layernorm.weight"]
        mlp = linear(F.gelu(linear(h, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        x = x + o + mlp  # parallel block
    return linear(ln(x, "model.final_layernorm"), "lm_head")


@pytest.fixture(scope="module")
def model():
    from edge_vlm.llms.phi_qknorm import TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM

    torch.manual_seed(0)
    cfg = TinyGPTVPhiConfig(vocab_size=300, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=64, initializer_range=0.1)
    m = TinyGPTVPhiForCausalLM(cfg).eval()
    with torch.no_grad():  # every norm weight and bias non-trivial, so a skipped one shows
        for name, p in m.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return m


def test_module_matches_the_computation_written_out(model):
    ids = torch.randint(0, 300, (9,))
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0]
        want = phi_variant_by_hand(dict(model.state_dict()), model.config, ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_kv_cache_steps_equal_one_full_pass(model):
    from transformers import DynamicCache

    ids = torch.randint(0, 300, (8,))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[None, :5], past_key_values=cache, use_cache=True)
        for t in range(5, 8):
            step = model(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True,
                         position_ids=torch.tensor([[t]])).logits[0, -1]
        full = phi_variant_by_hand(dict(model.state_dict()), model.config, ids)[-1]
    assert torch.allclose(step, full, atol=1e-4)


def test_parameter_names_are_old_format_phi2():
    from edge_vlm.llms.phi_qknorm import TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM

    names = set(TinyGPTVPhiForCausalLM(TinyGPTVPhiConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                                         num_hidden_layers=1, num_attention_heads=2)).state_dict())
    layer = {n[len("model.layers.0."):] for n in names if n.startswith("model.layers.0.")}
    assert layer == {f"{m}.{w}" for m, ws in {
        "self_attn.query_key_value": "wb", "self_attn.dense": "wb", "self_attn.q_layernorm": "wb",
        "self_attn.k_layernorm": "wb", "input_layernorm": "wb", "post_layernorm": "w", "mlp.fc1": "wb",
        "mlp.fc2": "wb"}.items() for w in [{"w": "weight", "b": "bias"}[c] for c in ws]}
    assert {"model.embed_tokens.weight", "model.final_layernorm.weight", "lm_head.weight", "lm_head.bias"} <= names
