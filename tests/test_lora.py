"""LLM adapters (edge_vlm/llms/lora.py): trained by align, merged when a source loads, refused clearly when wrong."""
import json

import pytest
import torch
from safetensors.torch import save_file

from edge_vlm.errors import SourceError
from edge_vlm.llms import lora


def _llm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _trained(llm, rank=3):
    w = lora.attach(llm, rank)
    with torch.no_grad():
        for m in w.values():
            m.lora_B.normal_(std=0.05)
    return w


IDS = torch.tensor([[1, 5, 7, 9, 11]])


def test_a_merged_adapter_gives_the_adapted_model(tmp_path):
    llm = _llm()
    wrapped = _trained(llm)
    with torch.no_grad():
        want = llm(IDS).logits
    save_file(lora.state(wrapped), str(tmp_path / "a.safetensors"))
    lora.detach(llm, wrapped)
    fresh = _llm()
    with torch.no_grad():
        base = fresh(IDS).logits
    assert lora.merge(fresh, tmp_path / "a.safetensors") == 8  # q, k, v, o in 2 layers
    with torch.no_grad():
        got = fresh(IDS).logits
    assert (want - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_two_adapters_combine_into_one_file(tmp_path):
    first, second = lora.state(_trained(_llm())), lora.state(_trained(_llm(1), rank=2))
    save_file(first, str(tmp_path / "1.safetensors"))
    save_file(second, str(tmp_path / "2.safetensors"))
    save_file(lora.combine(first, second), str(tmp_path / "both.safetensors"))
    a, b = _llm(), _llm()
    lora.merge(a, tmp_path / "1.safetensors")
    lora.merge(a, tmp_path / "2.safetensors")
    lora.merge(b, tmp_path / "both.safetensors")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize("breakage, says", [
    (lambda t: {k.replace("layers.0", "layers.9"): v for k, v in t.items()}, "not a linear layer"),
    (lambda t: {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in t.items()}, "do not fit Linear"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith("o_proj.lora_B.weight")}, r"missing keys.*o_proj"),
    (lambda t: {**t, "model.norm.weight": torch.ones(32)}, "not an edge-vlm adapter"),
])
def test_a_wrong_adapter_is_refused_by_name(tmp_path, breakage, says):
    tensors = breakage(lora.state(_trained(_llm())))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SourceError, match=says):
        lora.merge(_llm(), tmp_path / "bad.safetensors")


def test_a_damaged_adapter_file_is_a_source_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(SourceError, match="not a readable safetensors"):
        lora.merge(_llm(), tmp_path / "bad.safetensors")


def test_align_with_lora_writes_an_adapter_that_the_source_merges(tiny_source, tmp_path):
    from test_align import _cfg

    from edge_vlm.align import run
    from edge_vlm.families import load_source

    s = run(_cfg(tiny_source, tmp_path / "l", tmp_path / "cl", lora_rank=2), log=lambda *a: None)
    assert s["lora"]["rank"] == 2 and s["lora"]["params"] > 0
    desc = json.loads((tmp_path / "l" / "edge-vlm-source.json").read_text())
    assert desc["llm"]["adapter"] == "lora.safetensors" and (tmp_path / "l" / "lora.safetensors").is_file()
    base, tuned = load_source(str(tiny_source)).llm, load_source(str(tmp_path / "l")).llm
    q = "model.layers.0.self_attn.q_proj.weight"
    b, t = base.state_dict(), tuned.state_dict()
    assert not torch.equal(b[q], t[q])  # merged
    assert torch.equal(b["model.layers.0.mlp.down_proj.weight"], t["model.layers.0.mlp.down_proj.weight"])
    assert all("lora_" not in k for k in t)  # an ordinary LLM: every backend exports it
