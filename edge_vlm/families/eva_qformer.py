"""EVA-CLIP ViT-g/14 + `ln_vision` + the BLIP-2 Q-Former, loaded from the LAVIS files into
transformers' `Blip2VisionModel` and `Blip2QFormerModel` through one rename table.

Sources (families.md): `eva_vit_g.pth` is LAVIS `eva_vit.py`'s flat state dict (fp16, 40 blocks
of which 39 run, §1.1 and corrections 2); `blip2_pretrained_flant5xxl.pth` is LAVIS's BLIP-2/T5
stage-2 checkpoint, `['model']` holding `query_tokens`, `ln_vision.*` and `Qformer.bert.*`
(§1.2, corrections 1). Norm eps differ: ViT blocks 1e-6, `ln_vision` 1e-5 (it becomes
`Blip2VisionModel.post_layernorm`, whose eps we set apart), Q-Former (BERT) 1e-12.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_vlm.families.checkpoints import Rename

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # blip_processors.py (§1.6)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VitDims:
    """EVA ViT-g/14 as MiniGPT-4 builds it (`create_eva_vit_g`, §1.1). Depth comes from here, never
    from counting blocks in the file (the file holds one more)."""

    width: int = 1408
    depth: int = 39
    heads: int = 16  # 1408 // 88
    mlp: int = 6144  # int(1408 * 4.3637)
    patch: int = 14
    weights_size: int = 224  # the grid `pos_embed` was trained at (16 x 16)
    eps: float = 1e-6
    ln_vision_eps: float = 1e-5


@dataclass(frozen=True)
class QFormerDims:
    """BERT-base Q-Former of BLIP-2 (§1.2): cross-attention on every 2nd layer from layer 0."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    queries: int = 32
    cross_freq: int = 2
    eps: float = 1e-12


# ---- the rename table: LAVIS name (left) -> transformers Blip2 name (right) ----
VIT_RENAMES = (
    # eva_vit.py VisionTransformer.cls_token / pos_embed / patch_embed.proj (Conv2d 14x14 stride 14)
    Rename("cls_token", "embeddings.class_embedding"),
    Rename("pos_embed", "embeddings.position_embedding"),
    Rename("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    Rename("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
    # eva_vit.py Block: pre-norm norm1 -> Attention -> norm2 -> Mlp (fc1, GELU, fc2)
    Rename("blocks.{i}.norm1.weight", "encoder.layers.{i}.layer_norm1.weight", "layers"),
    Rename("blocks.{i}.norm1.bias", "encoder.layers.{i}.layer_norm1.bias", "layers"),
    # eva_vit.py Attention: bias-free fused qkv Linear(W, 3W); q_bias / v_bias fused below
    Rename("blocks.{i}.attn.qkv.weight", "encoder.layers.{i}.self_attn.qkv.weight", "layers"),
    Rename("blocks.{i}.attn.proj.weight", "encoder.layers.{i}.self_attn.projection.weight", "layers"),
    Rename("blocks.{i}.attn.proj.bias", "encoder.layers.{i}.self_attn.projection.bias", "layers"),
    Rename("blocks.{i}.norm2.weight", "encoder.layers.{i}.layer_norm2.weight", "layers"),
    Rename("blocks.{i}.norm2.bias", "encoder.layers.{i}.layer_norm2.bias", "layers"),
    Rename("blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.mlp.fc1.weight", "layers"),
    Rename("blocks.{i}.mlp.fc1.bias", "encoder.layers.{i}.mlp.fc1.bias", "layers"),
    Rename("blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.mlp.fc2.weight", "layers"),
    Rename("blocks.{i}.mlp.fc2.bias", "encoder.layers.{i}.mlp.fc2.bias", "layers"),
)
# eva_vit.py Attention: qkv bias = cat(q_bias, zeros, v_bias) (there is no k bias);
# transformers keeps it as one `qkv.bias` parameter
VIT_QKV_BIAS = ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.v_bias", "encoder.layers.{i}.self_attn.qkv.bias")

# minigpt4.py `init_vision_encoder`: ln_vision = LayerNorm(1408) on the ViT output, loaded from the
# BLIP-2 file; it is Blip2VisionModel's post_layernorm
LN_VISION_RENAMES = (
    Rename("ln_vision.weight", "post_layernorm.weight"),
    Rename("ln_vision.bias", "post_layernorm.bias"),
)

QFORMER_PREFIX = "Qformer.bert."
_SELF, _CROSS = "encoder.layer.{i}.attention", "encoder.layer.{i}.crossattention"
QFORMER_RENAMES = (
    # Qformer.py BertEmbeddings: only its LayerNorm runs on the query tokens (word/position
    # embeddings were deleted before saving, corrections 1)
    Rename("embeddings.LayerNorm.weight", "layernorm.weight"),
    Rename("embeddings.LayerNorm.bias", "layernorm.bias"),
    # Qformer.py BertLayer.attention: BertSelfAttention (`self`) + BertSelfOutput (`output`)
    *(Rename(f"{_SELF}.self.{p}.{w}", f"{_SELF}.attention.{p}.{w}", "layers")
      for p in ("query", "key", "value") for w in ("weight", "bias")),
    *(Rename(f"{_SELF}.output.{p}.{w}", f"{_SELF}.output.{p}.{w}", "layers")
      for p in ("dense", "LayerNorm") for w in ("weight", "bias")),
    # Qformer.py BertLayer.crossattention, on layers i % cross_attention_freq == 0 (key/value read
    # the ViT width)
    *(Rename(f"{_CROSS}.self.{p}.{w}", f"{_CROSS}.attention.{p}.{w}", "cross")
      for p in ("query", "key", "value") for w in ("weight", "bias")),
    *(Rename(f"{_CROSS}.output.{p}.{w}", f"{_CROSS}.output.{p}.{w}", "cross")
      for p in ("dense", "LayerNorm") for w in ("weight", "bias")),
    # Qformer.py BertLayer.intermediate_query / output_query: the query branch's FFN (the text
    # branch's `intermediate` / `output` were deleted by MiniGPT-4)
    *(Rename(f"encoder.layer.{{i}}.{p}.{w}", f"encoder.layer.{{i}}.{p}.{w}", "layers")
      for p in ("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm") for w in ("weight", "bias")),
)

# Keys of the BLIP-2 file that MiniGPT-4 does not use: each with why it is safe to ignore
BLIP2_IGNORED = {
    r"Qformer\.bert\.embeddings\.position_ids": "buffer (position ids of the deleted text embeddings)",
    r"t5_proj\..*": "BLIP-2's projection into Flan-T5 (MiniGPT-4 uses llama_proj)",
    r"t5_model\..*": "BLIP-2's Flan-T5 (not used)",
    r"visual_encoder\..*": "ViT weights (MiniGPT-4 loads them from eva_vit_g.pth)",
    r"Qformer\.cls\..*": "text head (deleted by MiniGPT-4)",
    r"Qformer\.bert\.embeddings\.(word|position)_embeddings\..*": "text embeddings (deleted by MiniGPT-4)",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*": "text-branch FFN (deleted by MiniGPT-4)",
}


def vision_model(dims: VitDims, image_size: int, ln_vision_eps: float):
    """An empty Blip2VisionModel shaped like EVA ViT-g; post_layernorm plays `ln_vision`."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = Blip2VisionConfig(hidden_size=dims.width, intermediate_size=dims.mlp, num_hidden_layers=dims.depth,
                            num_attention_heads=dims.heads, image_size=image_size, patch_size=dims.patch,
                            hidden_act="gelu", layer_norm_eps=dims.eps, qkv_bias=True)
    cfg._attn_implementation = "eager"  # traced into ONNX as plain matmuls
    m = Blip2VisionModel(cfg)
    m.post_layernorm.eps = ln_vision_eps  # ln_vision: torch's default 1e-5, not the blocks' 1e-6
    return m


def qformer_model(dims: QFormerDims, encoder_width: int):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(hidden_size=dims.hidden, num_hidden_layers=dims.layers,
                             num_attention_heads=dims.heads, intermediate_size=dims.intermediate,
                             cross_attention_frequency=dims.cross_freq, encoder_hidden_size=encoder_width,
                             layer_norm_eps=dims.eps, hidden_act="gelu")
    cfg._attn_implementation = "eager"
    return Blip2QFormerModel(cfg)


def resize_pos_embed(pos, grid: int):
    """eva_vit.py `interpolate_pos_embed`: patch position embeddings resized bicubically
    (align_corners=False) to the new grid; the CLS position is kept."""
    import torch

    n = pos.shape[1] - 1
    old = int(round(n ** 0.5))
    if old * old != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls.float(), patches.permute(0, 2, 3, 1).flatten(1, 2)], 1)


def vit_indices(dims: VitDims) -> dict:
    return {"layers": range(dims.depth)}


def qformer_indices(dims: QFormerDims) -> dict:
    return {"layers": range(dims.layers), "cross": range(0, dims.layers, dims.cross_freq)}
