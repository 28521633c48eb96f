"""A model's shape, as far as memory is concerned: parameter counts and the KV-cache geometry.

From a family name (full-size shapes of `edge-vlm synth`: no files needed), a source folder
(family table + the LLM folder's config.json, no weights read) or a bundle (its manifest and
exact file sizes). Parameter counts are computed from the dimensions, layer by layer, the way
the families build them (families.md); tests check them against real models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_vlm.errors import BadInput, BundleError


@dataclass(frozen=True)
class LLMShape:
    arch: str  # llama | phi2 | other HF model_type
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ff: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_matrix_params(self) -> int:
        """Weights of the matrices inside the decoder blocks: what every backend quantizes."""
        h, kv, f = self.hidden, self.kv_dim, self.ff
        per = 2 * h * h + 2 * h * kv + (2 if self.arch == "phi2" else 3) * h * f
        return self.layers * per

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:  # the output projection, 0 when tied to the embeddings
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def other_params(self) -> int:  # norms and biases (kept in float by every backend)
        h, f = self.hidden, self.ff
        if self.arch == "phi2":  # biases of qkv (3h), dense, fc1, fc2; input LayerNorm (2h); TinyGPT-V's
            # post_layernorm (RMS, h) and q/k LayerNorms over a head (4 x head_dim); lm_head bias
            return self.layers * (3 * h + h + f + h + 2 * h + h + 4 * self.head_dim) + 2 * h + self.vocab
        return self.layers * 2 * h + h

    @property
    def params(self) -> int:
        return self.block_matrix_params + self.embed_params + self.head_params + self.other_params

    def to_dict(self) -> dict:
        return {"arch": self.arch, "hidden": self.hidden, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "ff": self.ff, "vocab": self.vocab, "tied": self.tied}


@dataclass(frozen=True)
class VisionShape:
    params: int  # everything that goes into vision.onnx (encoder + connector + projection)
    seq: int  # tokens inside the encoder (activations), e.g. 257 for ViT-g at 224
    width: int
    mlp: int
    heads: int
    image_tokens: int  # what enters the LLM per image
    file_bytes: int | None = None  # exact, for a bundle


@dataclass(frozen=True)
class ModelShape:
    name: str
    vision: VisionShape
    llm: LLMShape
    bundle: dict = field(default_factory=dict)  # for a bundle: backend, bits, quant, file bytes


def llm_shape_from_config(cfg) -> LLMShape:
    """An HF config (object or dict) -> LLMShape. TinyGPT-V's Phi variant is `phi2`."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    mt = get("model_type", "llama")
    arch = "phi2" if mt in ("phi", "phi-msft", "tinygpt_v_phi") else mt
    hidden = get("hidden_size") or get("n_embd")
    heads = get("num_attention_heads") or get("n_head")
    return LLMShape(arch=arch, hidden=hidden, layers=get("num_hidden_layers") or get("n_layer"), heads=heads,
                    kv_heads=get("num_key_value_heads") or heads,
                    ff=get("intermediate_size") or get("n_inner") or 4 * hidden, vocab=get("vocab_size"),
                    tied=bool(get("tie_word_embeddings", False)))


def llm_shape_from_file(path: Path) -> LLMShape:
    """An LLM folder's config.json, read and checked (types, bounds) before any arithmetic."""
    from pydantic import ValidationError

    from edge_vlm.errors import SourceError
    from edge_vlm.manifest import LLMShapeSpec, describe_errors
    from edge_vlm.textfiles import read_structured

    cfg = read_structured(path, SourceError)
    if not isinstance(cfg, dict):
        raise SourceError(f"{path} holds no JSON object: is it the LLM's transformers config?")
    try:
        shape = llm_shape_from_config(cfg)  # old-format Phi-2 folders say model_type "phi": phi2
        LLMShapeSpec.model_validate(shape.to_dict(), strict=True)
    except ValidationError as e:
        raise SourceError(f"{path}: {describe_errors(e)} (hidden_size, num_hidden_layers, num_attention_heads, "
                          "intermediate_size and vocab_size must be whole numbers)") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise SourceError(f"{path} does not describe a decoder edge-vlm can plan ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None
    return shape


def eva_vit_params(width: int, depth: int, mlp: int, patch: int, image_size: int) -> tuple[int, int]:
    """(params, sequence length) of EVA ViT-g + ln_vision (families.md §1.1)."""
    n = (image_size // patch) ** 2
    block = 4 * width + 3 * width * width + 3 * width + width * width + width + 2 * width * mlp + mlp + width
    return 3 * patch * patch * width + width + width + (n + 1) * width + depth * block + 2 * width, n + 1


def qformer_params(h: int, layers: int, inter: int, queries: int, cross_freq: int, enc: int) -> int:
    """BLIP-2's Q-Former as MiniGPT-4 runs it (no text FFN, no word embeddings), §1.2."""
    self_attn = 4 * (h * h + h) + 2 * h
    ffn = 2 * h * inter + inter + h + 2 * h
    cross = 2 * (h * h + h) + 2 * (enc * h + h) + 2 * h
    n_cross = len(range(0, layers, cross_freq))
    return queries * h + 2 * h + layers * (self_attn + ffn) + n_cross * cross


def upstream_vision(family: str, llm_hidden: int, vit: dict | None = None, qformer: dict | None = None,
                    proj_mid: int = 4096) -> VisionShape:
    from edge_vlm.families import eva_qformer as eq
    from edge_vlm.families.minigpt import FAMILIES

    spec = FAMILIES[family]
    v, q = eq.VitDims(**(vit or {})), eq.QFormerDims(**(qformer or {}))
    params, seq = eva_vit_params(v.width, v.depth, v.mlp, v.patch, spec.image_size)
    if spec.connector == "qformer":
        params += qformer_params(q.hidden, q.layers, q.intermediate, q.queries, q.cross_freq, v.width)
        widths = [q.hidden, proj_mid, llm_hidden] if len(spec.projections) == 2 else [q.hidden, llm_hidden]
        tokens = q.queries
    else:  # concat4: drop CLS, 4 consecutive tokens -> one
        widths, tokens = [4 * v.width, llm_hidden], (seq - 1) // 4
    params += sum(a * b + b for a, b in zip(widths, widths[1:]))
    return VisionShape(params, seq, v.width, v.mlp, v.heads, tokens)


def from_family_shape(name: str) -> ModelShape:
    """A full-size shape by name (`edge-vlm synth`'s names: minigpt4-7b, tinygpt-v, ...)."""
    from edge_vlm.families.synth import SHAPES

    s = SHAPES[name]
    d = s.llm
    llm = LLMShape("phi2" if "tinygpt" in s.family else "llama", d.hidden, d.layers, d.heads, d.heads,
                   d.intermediate, d.vocab)
    return ModelShape(name, upstream_vision(s.family, d.hidden), llm)


def from_source(source: str) -> ModelShape:
    """A source folder or built-in model, without loading its weights."""
    from edge_vlm.families import describe_source

    root, desc = describe_source(source)
    fam = desc.get("family")
    if "shape" in desc:  # declared by the source (the built-in model), checked against the real modules in tests
        v, llm = desc["shape"]["vision"], desc["shape"]["llm"]
        return ModelShape(desc.get("name") or root.name, VisionShape(**v), LLMShape(**llm))
    from edge_vlm.families.minigpt import FAMILIES

    if fam not in FAMILIES:  # a source without a declared shape (a retrained nano, test models): count it loaded
        from edge_vlm.families import load_source

        src = load_source(source)
        return ModelShape(desc.get("name") or root.name,
                          VisionShape(image_tokens=src.description["image_tokens"], **vision_shape_of(src)),
                          llm_shape_from_config(src.llm.config))
    llm_dir = Path(desc.get("llm", ""))
    llm_dir = llm_dir if llm_dir.is_absolute() else root / llm_dir
    llm = llm_shape_from_file(llm_dir / "config.json")
    mid = (desc.get("synth") or {}).get("proj_mid", 4096)  # TinyGPT-V's llama_proj width (MiniGPT-4 7B's)
    vision = upstream_vision(fam, llm.hidden, desc.get("vit_dims"), desc.get("qformer_dims"), mid)
    return ModelShape(desc.get("name") or root.name, vision, llm)


def gguf_bits(quant: str | None) -> int | None:
    """llama.cpp type name -> nominal bits (Q4_K_M -> 4, Q8_0 -> 8, F16 -> 16)."""
    if not quant:
        return None
    q = quant.upper()
    if q.startswith(("F", "BF")):
        return int("".join(ch for ch in q if ch.isdigit()) or 32)
    digits = "".join(ch for ch in q.split("_")[0] if ch.isdigit())
    return int(digits) if digits else None


def vision_shape_dict(v: VisionShape) -> dict:
    return {"params": v.params, "seq": v.seq, "width": v.width, "mlp": v.mlp, "heads": v.heads}


def from_bundle(bundle: Path) -> ModelShape:
    """Exact file sizes from the manifest; the KV geometry from `llm.shape` (written at export). A
    bundle from before `llm.shape` existed is planned from its source, if that is still on disk."""
    from edge_vlm.manifest import llm_weight_files, load_manifest

    m = load_manifest(bundle)
    if m.llm.shape:
        llm = m.llm.shape.model_dump()
        vis = m.vision.shape.model_dump() if m.vision.shape else \
            {"params": 0, "seq": 64, "width": 1280, "mlp": 1280, "heads": 1}
    else:
        path = m.source.path
        try:
            src = from_source(path)
        except Exception as e:  # noqa: BLE001 - any failure means: this old bundle cannot be planned
            raise BadInput(f"{bundle} was exported by an older edge-vlm (no llm.shape in its manifest) and its "
                           f"source {path} cannot be read ({e}): export it again") from e
        llm, vis = src.llm, vision_shape_dict(src.vision)
    vision_files = {f: r.bytes for f, r in m.files.items()
                    if f == m.vision.file or f.startswith(m.vision.file + ".")}
    weights = llm_weight_files(m)
    try:
        vision = VisionShape(image_tokens=m.vision.n_image_tokens, file_bytes=sum(vision_files.values()), **vis)
        llm = llm if isinstance(llm, LLMShape) else LLMShape(**llm)
    except TypeError as e:
        raise BundleError(f"{bundle}: the manifest's vision.shape / llm.shape is not what this edge-vlm reads ({e}): "
                          "export the bundle again with this version") from e
    return ModelShape(m.source.name or Path(bundle).name, vision, llm, bundle={
        "backend": m.llm.backend, "bits": m.llm.quant.bits or gguf_bits(m.llm.quant.requested),
        "quant": m.llm.quant.model_dump(),
        "vision_precision": m.vision.precision, "vision_built_for": m.vision.built_for, "llm_weight_bytes": sum(weights.values()),
        "onnx_dtype": m.llm.onnx_graph.dtype if m.llm.onnx_graph else None,
        "vision_bytes": sum(vision_files.values()), "files": {f: r.bytes for f, r in m.files.items()}})


def vision_shape_of(src) -> dict:
    """The manifest's vision.shape: parameter count of the loaded vision stack + its geometry."""
    params = sum(p.numel() for p in src.vision.parameters())
    geo = {"seq": 64, "width": 1280, "mlp": 1280, "heads": 1}  # a small CNN encoder (the built-in model)
    try:
        from edge_vlm.families.minigpt import FAMILIES

        if src.family in FAMILIES:
            d = src.description
            v = upstream_vision(src.family, 0, d.get("vit_dims"), d.get("qformer_dims"))
            geo = {k: x for k, x in vision_shape_dict(v).items() if k != "params"}
    except Exception:  # noqa: BLE001 - only the activation estimate needs the geometry
        pass
    return {**geo, "params": int(params)}


def llm_shape_of(src) -> dict:
    """The manifest's llm.shape, from the loaded LLM's config."""
    return llm_shape_from_config(src.llm.config).to_dict()
