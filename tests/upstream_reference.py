"""Independent reference forward of the MiniGPT-4-family models, for checking edge-vlm's exports.

Plain torch (torch.nn.functional) over the RAW upstream state dicts, addressed by their upstream
key names, written from /work/shared/families.md alone -- nothing here imports edge_vlm or
transformers' Blip2 classes, so it is an independent check on edge-vlm's key-rename tables.
Everything runs in float32 under torch.no_grad(); the fp16 ViT file is upcast before use.

Which part of families.md each piece follows ("C.n" = "Corrections and additions" item n):
  eva_vit            §1.1 (pre-norm blocks, q_bias/v_bias, no final norm, bicubic pos-embed
                     resize for 448), C.2 (fp16 file, only the first `depth` blocks), §2.1 (stage 4).
  qformer            §1.2 (BERT post-norm, query-only FFN, cross-attention every cross_freq
                     layers, eps 1e-12), C.1 (blip2_pretrained_flant5xxl layout), §4.3.
  image_embeddings   §1.3 and §4.1-2 (connectors; row-major 4-token concat), C.3 (identity
                     ln_vision without a Q-Former), §2.1 (TinyGPT-V llama_proj -> llama_proj2, no
                     nonlinearity, Q-Former also at 448), §1.7/§2.5 (ckpt['model'] loaded
                     non-strictly on top, so Q-Former-side keys in it win).
  UpstreamLLM        §1.4 + C.5 (HF Llama, peft 0.2.0 LoRA on q/v_proj, unmerged), §2.2 + C.6-8
                     (TinyGPT-V's Phi-2: fused per-head qkv, QK-LayerNorm, partial rotary,
                     post-attention RMSNorm, parallel block, LoRA on query_key_value/dense).
  greedy             §1.5 / §2.3 splicing: [embed(before)][image][embed(after)] via inputs_embeds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

PATCH = 14
QFORMER_FAMILIES = {"minigpt4", "tinygpt-v", "tinygpt-v-stage4"}
CONCAT_FAMILIES = {"minigpt4-llama2", "minigpt-v2"}
PEFT = "llama_model.base_model.model.model."  # peft 0.2.0 wrapping prefix (C.5, C.6)


def _f32(sd: dict, key: str) -> torch.Tensor:
    return sd[key].float()


def _linear(sd: dict, prefix: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    return F.linear(x, _f32(sd, prefix + ".weight"), _f32(sd, prefix + ".bias") if bias else None)


def _layer_norm(sd: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], _f32(sd, prefix + ".weight"), _f32(sd, prefix + ".bias"), eps)


def _attention(q, k, v, heads: int, causal: bool = False) -> torch.Tensor:
    """q [B,Tq,C], k/v [B,Tk,C] -> softmax(q k^T / sqrt(hd)) v, heads merged back to [B,Tq,C]."""
    (b, tq, c), tk = q.shape, k.shape[1]
    hd = c // heads
    q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, c)


# --- §1.1 EVA-CLIP ViT-g/14 --------------------------------------------------------------------
def eva_vit(vit_sd: dict, pixels: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    with torch.no_grad():
        sd, x = vit_sd, pixels.float()
        x = F.conv2d(x, _f32(sd, "patch_embed.proj.weight"), _f32(sd, "patch_embed.proj.bias"), stride=PATCH)
        x = x.flatten(2).transpose(1, 2)  # [B, N, W], row-major patches
        b, n, w = x.shape
        pos = _f32(sd, "pos_embed")
        if pos.shape[1] != 1 + n:  # interpolate_pos_embed: patch part only, CLS kept
            old, new = int(round(math.sqrt(pos.shape[1] - 1))), int(round(math.sqrt(n)))
            grid = pos[:, 1:].reshape(1, old, old, w).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, w)], dim=1)
        x = torch.cat([_f32(sd, "cls_token").expand(b, -1, -1), x], dim=1) + pos
        for i in range(depth):  # the file may hold more blocks (C.2): they are never read
            p = f"blocks.{i}."
            h = _layer_norm(sd, p + "norm1", x, 1e-6)
            qkv_bias = torch.cat([_f32(sd, p + "attn.q_bias"), torch.zeros(w), _f32(sd, p + "attn.v_bias")])
            q, k, v = F.linear(h, _f32(sd, p + "attn.qkv.weight"), qkv_bias).chunk(3, dim=-1)
            x = x + _linear(sd, p + "attn.proj", _attention(q, k, v, heads))
            h = _layer_norm(sd, p + "norm2", x, 1e-6)
            x = x + _linear(sd, p + "mlp.fc2", F.gelu(_linear(sd, p + "mlp.fc1", h)))
        return x  # no final norm: ln_vision plays that role


# --- §1.2 Q-Former -----------------------------------------------------------------------------
def qformer(blip2_model_sd: dict, image_feats: torch.Tensor, n_layers: int, heads: int,
            cross_freq: int = 2) -> torch.Tensor:
    with torch.no_grad():
        sd, img = blip2_model_sd, image_feats.float()
        x = _f32(sd, "query_tokens").expand(img.shape[0], -1, -1)
        x = _layer_norm(sd, "Qformer.bert.embeddings.LayerNorm", x, 1e-12)
        for i in range(n_layers):
            p = f"Qformer.bert.encoder.layer.{i}."
            blocks = [("attention", x)] + ([("crossattention", img)] if i % cross_freq == 0 else [])
            for name, kv in blocks:  # post-norm: LayerNorm(residual + sublayer)
                a = p + name
                att = _attention(_linear(sd, a + ".self.query", x), _linear(sd, a + ".self.key", kv),
                                 _linear(sd, a + ".self.value", kv), heads)
                x = _layer_norm(sd, a + ".output.LayerNorm", x + _linear(sd, a + ".output.dense", att), 1e-12)
            h = F.gelu(_linear(sd, p + "intermediate_query.dense", x))
            x = _layer_norm(sd, p + "output_query.LayerNorm", x + _linear(sd, p + "output_query.dense", h), 1e-12)
        return x


# --- §1.3 / §2.1 connectors --------------------------------------------------------------------
def image_embeddings(family: str, vit_sd: dict, blip2_model_sd: dict | None, ckpt_model_sd: dict,
                     pixels: torch.Tensor, vit_depth: int, vit_heads: int, qformer_layers: int,
                     qformer_heads: int) -> torch.Tensor:
    if family not in QFORMER_FAMILIES | CONCAT_FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    with torch.no_grad():
        vit = eva_vit(vit_sd, pixels, vit_depth, vit_heads)
        ck = ckpt_model_sd
        if family in CONCAT_FAMILIES:  # C.3: fresh LayerNorm(eps 1e-5), weight 1 / bias 0
            x = F.layer_norm(vit, vit.shape[-1:], eps=1e-5)[:, 1:, :]
            b, n, w = x.shape
            return _linear(ck, "llama_proj", x.reshape(b, n // 4, 4 * w))  # == .view: 4 consecutive tokens
        # ckpt['model'] is load_state_dict(strict=False)-ed after BLIP-2: any Q-Former-side key it holds wins
        sd = dict(blip2_model_sd)
        sd.update({k: v for k, v in ck.items()
                   if k == "query_tokens" or k.startswith(("ln_vision.", "Qformer."))})
        q = qformer(sd, _layer_norm(sd, "ln_vision", vit, 1e-5), qformer_layers, qformer_heads)
        x = _linear(ck, "llama_proj", q)
        return _linear(ck, "llama_proj2", x) if family.startswith("tinygpt-v") else x


# --- §1.4 / §2.2 language models ---------------------------------------------------------------
def _lora(ckpt: dict, prefix: str, alpha: float):
    """peft 0.2.0 names (no '.default.'); returns (A, B, alpha / r) or None when absent."""
    a, b = ckpt.get(prefix + ".lora_A.weight"), ckpt.get(prefix + ".lora_B.weight")
    if a is None or b is None:
        return None
    return a.float(), b.float(), alpha / a.shape[0]


def _with_lora(y: torch.Tensor, x: torch.Tensor, lora) -> torch.Tensor:
    """Unmerged LoRA as peft runs it: y = W x + b + scale * B(A x)."""
    if lora is None:
        return y
    a, b, scale = lora
    return y + scale * F.linear(F.linear(x, a), b)


class UpstreamLLM:
    def __init__(self, family: str, llm_dir, ckpt_model_sd: dict, lora_alpha: float = 16.0):
        self.family, self.alpha, self.ck = family, float(lora_alpha), ckpt_model_sd
        self.is_phi = family.startswith("tinygpt-v")
        if self.is_phi:
            self._init_phi(Path(llm_dir))
            return
        from transformers import LlamaForCausalLM

        self.llama = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32,
                                                      attn_implementation="eager").eval()
        for i, layer in enumerate(self.llama.model.layers):  # MiniGPT-v2 LoRA (absent for MiniGPT-4)
            for proj in ("q_proj", "v_proj"):
                lora = _lora(self.ck, f"{PEFT}layers.{i}.self_attn.{proj}", self.alpha)
                if lora is not None:
                    getattr(layer.self_attn, proj).register_forward_hook(
                        lambda mod, inp, out, lora=lora: _with_lora(out, inp[0], lora))

    def _init_phi(self, d: Path):
        from safetensors.torch import load_file

        cfg = json.loads((d / "config.json").read_text())
        self.sd = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
        self.n_layers, self.heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.hd = cfg["hidden_size"] // self.heads
        self.rd = int(cfg["partial_rotary_factor"] * self.hd)
        self.eps, self.theta = cfg["layer_norm_eps"], float(cfg.get("rope_theta", 10000.0))

    def _trained(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """A TinyGPT-V trained tensor: PEFT prefix (C.6), else the no-PEFT prefix, else `default`."""
        for key in (PEFT + name, "llama_model.model." + name):
            if key in self.ck:
                return self.ck[key].float()
        return default

    def embed(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            w = self.sd["model.embed_tokens.weight"] if self.is_phi else self.llama.get_input_embeddings().weight
            return w[torch.tensor(ids, dtype=torch.long)].float()

    def logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.is_phi:
                return self._phi_logits(inputs_embeds.float())
            return self.llama(inputs_embeds=inputs_embeds.float()[None]).logits[0].float()

    def _phi_logits(self, x: torch.Tensor) -> torch.Tensor:
        sd, n, hd, rd, eps = self.sd, x.shape[0], self.hd, self.rd, self.eps
        inv_freq = 1.0 / self.theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
        ang = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [n, rd]

        def rope(t):  # NeoX rotate-half on the first rd dims of each head; t [heads, n, hd]
            r, keep = t[..., :rd], t[..., rd:]
            rot = torch.cat([-r[..., rd // 2:], r[..., :rd // 2]], -1)
            return torch.cat([r * cos + rot * sin, keep], -1)

        ones, zeros = torch.ones(hd), torch.zeros(hd)
        for i in range(self.n_layers):
            p, t = f"model.layers.{i}.", f"layers.{i}."
            w_in = self._trained(t + "input_layernorm.weight", sd[p + "input_layernorm.weight"])  # ckpt wins
            h = F.layer_norm(x, x.shape[-1:], w_in, sd[p + "input_layernorm.bias"], eps)
            qkv = _with_lora(_linear(sd, p + "self_attn.query_key_value", h), h,
                             _lora(self.ck, PEFT + t + "self_attn.query_key_value", self.alpha))
            q, k, v = qkv.reshape(n, self.heads, 3, hd).permute(2, 1, 0, 3)  # per head [q|k|v] -> [heads, n, hd]
            q = rope(F.layer_norm(q, (hd,), self._trained(t + "self_attn.q_layernorm.weight", ones), zeros, eps))
            k = rope(F.layer_norm(k, (hd,), self._trained(t + "self_attn.k_layernorm.weight", ones), zeros, eps))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(
                torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            att = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
            o = _with_lora(_linear(sd, p + "self_attn.dense", att), att,
                           _lora(self.ck, PEFT + t + "self_attn.dense", self.alpha))
            w_post = self._trained(t + "post_layernorm.weight", torch.ones(o.shape[-1]))
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * w_post  # LlamaRMSNorm, no bias
            mlp = _linear(sd, p + "mlp.fc2", F.gelu(_linear(sd, p + "mlp.fc1", h), approximate="tanh"))
            x = x + o + mlp  # parallel block
        w_fin = self._trained("final_layernorm.weight", sd["model.final_layernorm.weight"])
        x = F.layer_norm(x, x.shape[-1:], w_fin, sd["model.final_layernorm.bias"], eps)
        return _linear(sd, "lm_head", x)


# --- §1.5 splicing + greedy decoding -------------------------------------------------------------
def greedy(llm: UpstreamLLM, before_ids: list[int], image_embeds: torch.Tensor, after_ids: list[int],
           n_new: int) -> list[int]:
    with torch.no_grad():
        if image_embeds.dim() == 3:  # [1, T, H] as image_embeddings returns it for one image
            assert image_embeds.shape[0] == 1, "greedy decodes one image at a time"
            image_embeds = image_embeds[0]
        img = image_embeds.float()
        seq = torch.cat([llm.embed(before_ids), img, llm.embed(after_ids)], dim=0)
        out: list[int] = []
        for _ in range(n_new):  # whole sequence each step, no KV cache; EOS not special-cased
            tok = int(llm.logits(seq)[-1].argmax())
            out.append(tok)
            seq = torch.cat([seq, llm.embed([tok])], dim=0)
        return out
