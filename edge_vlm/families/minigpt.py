"""The upstream families, loaded from their released files (families.md):

  minigpt4           MiniGPT-4 (Vicuna v0 7B/13B): EVA ViT-g 224 -> ln_vision -> Q-Former (32 queries) -> llama_proj
  minigpt4-llama2    MiniGPT-4 (Llama-2-7B-chat): ViT 224 -> LayerNorm(1, 0) -> drop CLS -> concat-4 -> llama_proj (64 tokens)
  minigpt-v2         MiniGPT-v2: as minigpt4-llama2 at 448 (256 tokens) + LoRA (q_proj, v_proj) merged into the LLM
  tinygpt-v          TinyGPT-V stages 2-3: ViT 224 -> Q-Former -> llama_proj -> llama_proj2 (no nonlinearity) -> Phi-2
                     variant with the checkpoint's trained norms and LoRA (query_key_value, dense)
  tinygpt-v-stage4   TinyGPT-V stage 4: the same at 448 (still 32 tokens), MiniGPT-v2-style template

A source names four files: `vit` (eva_vit_g.pth), `qformer` (blip2_pretrained_flant5xxl.pth; Q-Former
families), `ckpt` (the family's training checkpoint) and `llm` (an HF folder). Every file is read
strictly: missing keys the family needs and keys it would drop are errors that name them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_vlm.errors import CheckpointMismatch, SourceError
from edge_vlm.families import checkpoints as ck
from edge_vlm.families import eva_qformer as eq
from edge_vlm.families.lora import LoraSpec, merge_lora, split_lora
from edge_vlm.families.source import SourceModel
from edge_vlm.manifest import Preprocess, PromptSpec

# conversation.py CONV_VISION_Vicuna0 / CONV_VISION_LLama2 system text (families.md §1.5)
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
          "to you. Please answer my questions.")


@dataclass(frozen=True)
class FamilySpec:
    title: str
    image_size: int
    connector: str  # "qformer": Q-Former + projections; "concat4": drop CLS, 4 consecutive tokens, projection
    projections: tuple[str, ...]  # checkpoint Linear names applied in order, no nonlinearity in between
    llm: str  # "llama" | "phi2" (edge_vlm.families.upstream_llm)
    prompt: PromptSpec  # what upstream's own inference path renders (its demo): the default
    prompt_source: str  # where the template, BOS and stops come from
    train_prompt: PromptSpec  # the template the checkpoint was trained with (--prompt-style training)
    train_prompt_source: str
    lora: LoraSpec | None = None  # required LoRA (merged at load)
    trained_norms: bool = False  # TinyGPT-V: the checkpoint carries the LLM's norm weights
    default_backend: str = "gguf"


IMG = "<Img><ImageHere></Img>"
PROMPT_STYLES = ("inference", "training")
FAMILIES = {
    "minigpt4": FamilySpec(
        "MiniGPT-4 (Vicuna v0)", 224, "qformer", ("llama_proj",), "llama",
        PromptSpec(template=SYSTEM + f"###Human: {IMG} {{prompt}}###Assistant: ", add_bos=True, stop=["###"]),
        "demo.py: conversation.py CONV_VISION_Vicuna0; the LLaMA tokenizer adds BOS to the first segment; "
        "the demo stops on ### (ids 835 / 2277+29937)",
        PromptSpec(template=f"###Human: {IMG} {{prompt}} ###Assistant: ", add_bos=True, stop=["###"]),
        "train_configs/minigpt4_stage2_finetune.yaml: '###Human: {} ###Assistant: ', end_sym ###, BOS prepended"),
    "minigpt4-llama2": FamilySpec(
        "MiniGPT-4 (Llama-2-7B-chat)", 224, "concat4", ("llama_proj",), "llama",
        PromptSpec(template=SYSTEM + f"<s>[INST] {IMG} {{prompt}} [/INST] ", add_bos=True, stop=["</s>"]),
        "demo.py: conversation.py CONV_VISION_LLama2; BOS on the first segment; stops at </s>",
        PromptSpec(template=f"[INST] {IMG} {{prompt}} [/INST] ", add_bos=True, stop=["</s>"]),
        "train_configs/minigpt4_llama2_stage2_finetune.yaml: '[INST] {} [/INST] ', end_sym </s>"),
    "minigpt-v2": FamilySpec(
        "MiniGPT-v2 (Llama-2-7B-chat + LoRA)", 448, "concat4", ("llama_proj",), "llama",
        PromptSpec(template=f"<s>[INST] {IMG} {{prompt}} [/INST]", add_bos=True, stop=["</s>", "[/INST]"]),
        "demo_v2.py: conversation.py CONV_VISION_minigptv2; put a task tag ([vqa], [caption], [grounding], ...) "
        "at the start of the prompt; output cut at </s> and [/INST]",
        PromptSpec(template=f"[INST] {IMG} {{prompt}} [/INST]", add_bos=True, stop=["</s>", "[/INST]"]),
        "train_configs/minigptv2_finetune.yaml: '[INST] {} [/INST]', end_sym </s>",
        lora=LoraSpec(("q_proj", "v_proj"), alpha=16.0)),
    "tinygpt-v": FamilySpec(
        "TinyGPT-V (Phi-2, stages 2-3)", 224, "qformer", ("llama_proj", "llama_proj2"), "phi2",
        PromptSpec(template=SYSTEM + f"###Human: {IMG} {{prompt}}###Assistant: ", add_bos=False, stop=["###"]),
        "demo.py with eval_configs/tinygptv_stage1_2_3_eval.yaml: conversation.py CONV_VISION_Vicuna0 (MiniGPT-4's "
        "system text); Phi-2's tokenizer adds no BOS at inference (CodeGenTokenizer add_bos_token=False); "
        "the answer is cut at ###",
        PromptSpec(template=f"###Human: {IMG} {{prompt}} ###Assistant: ", add_bos=True, stop=["###"]),
        "train_configs/tinygptv_stage3.yaml: '###Human: {} ###Assistant: ', end_sym ###, BOS <|endoftext|> "
        "prepended in training",
        lora=LoraSpec(("query_key_value", "dense"), alpha=16.0), trained_norms=True, default_backend="onnx"),
    "tinygpt-v-stage4": FamilySpec(
        "TinyGPT-V (Phi-2, stage 4)", 448, "qformer", ("llama_proj", "llama_proj2"), "phi2",
        PromptSpec(template=f"<s>[INST] {IMG} {{prompt}} [/INST]", add_bos=False, stop=["###"]),
        "demo_v2.py: its own Conversation (roles '<s>[INST] ' / ' [/INST]'; <s> is plain text for Phi-2), no BOS, "
        "the answer is cut at ###; put a task tag ([vqa], ...) at the start of the prompt",
        PromptSpec(template=f"[INST] {IMG} {{prompt}}  [/INST]", add_bos=True, stop=["###"]),
        "train_configs/tinygptv_stage4.yaml: chat_template with from_config's default '[INST] {} [/INST]' around "
        "'<Img><ImageHere></Img> {} ', end_sym ###, BOS prepended in training",
        lora=LoraSpec(("query_key_value", "dense"), alpha=16.0), trained_norms=True, default_backend="onnx"),
}

# prefixes of the LLM's keys in training checkpoints: with and without PEFT's wrapping (corrections 6)
LLM_PREFIXES = ("llama_model.base_model.model.", "llama_model.")
NORM_KEYS = ("self_attn.q_layernorm.weight", "self_attn.k_layernorm.weight", "input_layernorm.weight",
             "post_layernorm.weight")
CKPT_IGNORED = {r".*rotary_emb\.inv_freq": "rotary buffer (recomputed)",
                r"Qformer\.bert\.embeddings\.position_ids": "buffer (position ids of the deleted text embeddings)"}
FILE_FIELDS = ("vit", "qformer", "ckpt", "llm")


@dataclass(frozen=True)
class UpstreamSource:
    """Everything that says how to load one upstream model (a description, a recipe or CLI flags)."""

    family: str
    vit: str
    ckpt: str
    llm: str
    qformer: str | None = None
    template: str | None = None  # override the family's prompt template ({prompt}, <ImageHere>)
    stop: tuple[str, ...] | None = None  # override the family's stop strings
    add_bos: bool | None = None  # override whether BOS starts the prompt (default: the family's prompt style)
    prompt_style: str = "inference"  # inference: what upstream's demo renders; training: the training template
    lora_alpha: float | None = None
    trust_checkpoint: bool = False
    tokenizer_pre: str = "default"  # llama.cpp pre-tokenizer name for byte-level BPE tokenizers
    vit_dims: eq.VitDims = field(default_factory=eq.VitDims)  # non-default only for miniature test models
    qformer_dims: eq.QFormerDims = field(default_factory=eq.QFormerDims)
    name: str = ""
    # the dtype the LLM is loaded (and the export validated) in: float16 halves a 7B's 27 GB, and is
    # how the upstream demos run it; float32 (default) is the exact reference
    llm_dtype: str = "float32"
    expect_image_size: int | None = None  # a recipe's statement of the family's shapes, checked at load
    expect_image_tokens: int | None = None

    @classmethod
    def from_description(cls, root: Path, desc: dict, where: str = "the source description") -> "UpstreamSource":
        """From a description (checked by source_schema: types, ranges, the files named); relative
        file paths start at `root`."""
        from edge_vlm.families.source_schema import UpstreamDescription, parse_source  # reads FAMILIES: no cycle

        d = parse_source(desc, where, allow_trust=True)
        if not isinstance(d, UpstreamDescription):
            raise SourceError(f"{where}: family {d.family!r} is not an upstream family")
        files = {f: str(Path(p) if Path(p).is_absolute() else root / p) for f in FILE_FIELDS
                 if (p := getattr(d, f)) is not None}
        return cls(family=d.family, **files, template=d.template, stop=tuple(d.stop) if d.stop is not None else None,
                   add_bos=d.add_bos, prompt_style=d.prompt_style or "inference",
                   lora_alpha=d.lora_alpha, trust_checkpoint=d.trust_checkpoint, tokenizer_pre=d.tokenizer_pre,
                   vit_dims=eq.VitDims(**d.vit_dims.model_dump()),
                   qformer_dims=eq.QFormerDims(**d.qformer_dims.model_dump()), name=d.name or "", llm_dtype=d.llm_dtype or "float32",
                   expect_image_size=d.image_size, expect_image_tokens=d.image_tokens)


def family_prompt(spec: FamilySpec, src: UpstreamSource) -> tuple[PromptSpec, str]:
    """The prompt a bundle runs with: the family's inference (default) or training template, with the
    user's template, stop strings and BOS choice over it; and where it comes from (for the manifest)."""
    base, source = (spec.prompt, spec.prompt_source) if src.prompt_style != "training" else \
        (spec.train_prompt, spec.train_prompt_source)
    overrides = [f"{k} (user)" for k, v in (("template", src.template), ("stop", src.stop), ("BOS", src.add_bos))
                 if v is not None]
    prompt = PromptSpec(template=src.template or base.template, image_marker=base.image_marker,
                        add_bos=base.add_bos if src.add_bos is None else src.add_bos,
                        stop=list(src.stop if src.stop is not None else base.stop))
    return prompt, source + (f"; overridden: {', '.join(overrides)}" if overrides else "")


def vision_stack_class():
    import torch
    from torch import nn

    class UpstreamVisionStack(nn.Module):
        """pixels [B,3,S,S] -> image embeddings [B, n_tokens, H]: ViT (+ ln_vision as its post_layernorm),
        then the Q-Former or concat-4, then the projections back to back."""

        def __init__(self, vit, projections, qformer=None, query_tokens=None, concat: int = 4):
            super().__init__()
            self.vit, self.qformer, self.concat = vit, qformer, concat
            self.query_tokens = nn.Parameter(query_tokens) if query_tokens is not None else None
            self.projections = nn.ModuleList(projections)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = self.vit(pixel_values=pixels).last_hidden_state  # [B, 1+N, W], ln_vision applied
            b = x.shape[0]
            if self.qformer is not None:
                x = self.qformer(query_embeds=self.query_tokens.expand(b, -1, -1),
                                 encoder_hidden_states=x).last_hidden_state
            else:  # minigpt_v2.py: image_embeds[:, 1:, :].view(bs, -1, 4 * W): 1x4 strips in raster order
                x = x[:, 1:, :].reshape(b, -1, x.shape[-1] * self.concat)
            for p in self.projections:
                x = p(x)
            return x

    return UpstreamVisionStack


def detect(ckpt_state: dict, vit_width: int = 1408, qformer_width: int = 768) -> tuple[str, str]:
    """(family, why) from a training checkpoint's keys and shapes: llama_proj2 is TinyGPT-V's; llama_proj
    reads the Q-Former's width (MiniGPT-4 Vicuna) or 4 ViT tokens (Llama-2 / v2, LoRA telling them apart)."""
    keys = set(ckpt_state)
    has_lora = any(".lora_A." in k for k in keys)
    if "llama_proj2.weight" in keys:
        if any(k.startswith("Qformer.") for k in keys):
            return "tinygpt-v-stage4", ("llama_proj + llama_proj2 and Q-Former weights: TinyGPT-V stage 4 (only its "
                                        "1.81 GB release is believed to carry the Q-Former)")
        return "tinygpt-v", ("llama_proj + llama_proj2: TinyGPT-V (stages 1-3; a stage-4 checkpoint without Q-Former "
                             "weights looks the same: pass --family tinygpt-v-stage4 for one)")
    if "llama_proj.weight" not in keys:
        raise SourceError("cannot detect the family: the checkpoint has no llama_proj.weight (keys: "
                          f"{', '.join(sorted(keys)[:6])} ...); pass --family")
    out_f, in_f = ckpt_state["llama_proj.weight"].shape
    size = {4096: "7B", 5120: "13B"}.get(out_f, f"hidden {out_f}")
    if has_lora:
        return "minigpt-v2", f"llama_proj [{out_f}, {in_f}] + LoRA on the LLM: MiniGPT-v2 ({size})"
    if in_f == 4 * vit_width:
        return "minigpt4-llama2", f"llama_proj [{out_f}, {in_f}] (4 x ViT width, no LoRA): MiniGPT-4 Llama-2 ({size})"
    if in_f == qformer_width:
        return "minigpt4", f"llama_proj [{out_f}, {in_f}] (Q-Former width): MiniGPT-4 Vicuna ({size})"
    raise SourceError(f"cannot detect the family: llama_proj reads {in_f} features, neither the Q-Former's "
                      f"{qformer_width} nor 4 x the ViT's {vit_width}; pass --family")


LLM_DTYPES = ("float32", "float16")
LLM_ARCH = {"llama": "llama", "phi2": "tinygpt_v_phi"}  # FamilySpec.llm -> the HF model_type it loads as


def load(root: Path, desc: dict, defer_llm: bool = False) -> SourceModel:
    try:
        src = UpstreamSource.from_description(Path(root), desc)
    except (KeyError, TypeError) as e:
        raise SourceError(f"source description is incomplete or malformed: {type(e).__name__} {e}") from e
    return load_upstream(src, defer_llm=defer_llm)


def load_upstream(src: UpstreamSource, log=lambda msg: print(msg, file=sys.stderr),
                  defer_llm: bool = False) -> SourceModel:
    """`defer_llm`: check the LLM folder's config now, load its weights only when `SourceModel.load_llm()`
    is called (export first converts and frees the vision model: peak memory is one of them, not both)."""
    import torch

    if src.llm_dtype not in LLM_DTYPES:
        raise SourceError(f"--llm-dtype {src.llm_dtype!r}: use one of {', '.join(LLM_DTYPES)}")
    ckpt_path = Path(src.ckpt)
    ckpt_state = ck.model_state(ck.load_torch_file(ckpt_path, "--ckpt", src.trust_checkpoint), ckpt_path, "--ckpt")
    detected = None
    if src.family == "auto":
        family, why = detect(ckpt_state, src.vit_dims.width, src.qformer_dims.hidden)
        log(f"family: {family} ({why})")
        detected = why
        src = replace(src, family=family)
    if src.family not in FAMILIES:
        raise SourceError(f"unknown family {src.family!r}; known: auto, {', '.join(FAMILIES)}")
    spec = FAMILIES[src.family]
    report = {}

    # ---- the training checkpoint: projections, and the LLM's LoRA / norms ----
    llm_part, rest = {}, {}
    for k, v in ckpt_state.items():
        prefix = next((p for p in LLM_PREFIXES if k.startswith(p)), None)
        (llm_part if prefix else rest)[k[len(prefix):] if prefix else k] = v
    proj_state, used = ck.rename(rest, [ck.Rename(f"{p}.{w}", f"{i}.{w}") for i, p in enumerate(spec.projections)
                                        for w in ("weight", "bias")], {}, f"--ckpt {ckpt_path} ({src.family})")
    qformer_override = {k: v for k, v in rest.items() if spec.connector == "qformer"
                        and k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    kr = ck.KeyReport()
    ck.check_unexpected(rest, used | set(qformer_override), CKPT_IGNORED, f"--ckpt {ckpt_path} ({src.family})", kr)

    # ---- vision: ViT (+ ln_vision) (+ Q-Former) + projections ----
    vit = _load_vit(src, spec, qformer_override, report)
    qformer = query_tokens = None
    if spec.connector == "qformer":
        qformer, query_tokens = _load_qformer(src, qformer_override, report)
        width_in = src.qformer_dims.hidden
    else:
        if src.qformer:
            raise SourceError(f"{src.family} has no Q-Former: drop --qformer (its ln_vision must not be applied "
                              "either, families.md corrections 3)")
        width_in = src.vit_dims.width * 4
    projections = []
    for i, name in enumerate(spec.projections):
        w = proj_state[f"{i}.weight"]
        if w.shape[1] != width_in:
            raise CheckpointMismatch(f"--ckpt {ckpt_path}", hint=f"{name}.weight is {tuple(w.shape)}: its input width "
                                     f"should be {width_in} for {src.family}; is this the right --family?")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        ck.load_into(lin, {"weight": w, "bias": proj_state[f"{i}.bias"]}, f"--ckpt {name}")
        projections.append(lin)
        width_in = w.shape[0]
    stack = vision_stack_class()(vit, projections, qformer, query_tokens).eval().requires_grad_(False)

    # ---- LLM: folder + the checkpoint's norms and LoRA ----
    from edge_vlm.families.upstream_llm import llm_config

    if not Path(src.llm).is_dir():
        raise SourceError(f"--llm {src.llm} is not a folder (expected a transformers-format model folder)")
    hidden = llm_config(Path(src.llm)).get("hidden_size")
    if hidden != width_in:
        raise CheckpointMismatch(f"--ckpt {ckpt_path}", hint=f"the last projection outputs {width_in} but the LLM in "
                                 f"{src.llm} has hidden size {hidden}: checkpoint and LLM do not belong "
                                 "together (7B vs 13B?)")

    def load_llm():
        llm, tok, llm_report = _load_llm(src, spec, llm_part, ckpt_path)
        report.update(llm_report)
        return llm, tok

    llm = tok = None
    if not defer_llm:
        llm, tok = load_llm()
    report["ckpt"] = kr.summary()
    n_tokens = _image_tokens(src, spec)
    for what, want, got in (("image_size", src.expect_image_size, spec.image_size),
                            ("image_tokens", src.expect_image_tokens, n_tokens)):
        if want is not None and want != got:
            raise SourceError(f"the recipe expects {what} {want} but {src.family} with these files has {got}: "
                              "wrong recipe for this family?")
    prompt, prompt_source = family_prompt(spec, src)
    pre = Preprocess(image_size=spec.image_size, mean=list(eq.CLIP_MEAN), std=list(eq.CLIP_STD), resize="bicubic")
    description = {
        "name": src.name or f"{src.family}-{Path(src.ckpt).stem}", "description": spec.title,
        "image_tokens": n_tokens, "tokenizer_pre": src.tokenizer_pre, "llm_source_quant": None,
        "llm_dtype": src.llm_dtype,  # the reference the export was validated against
        # LLaMA's SentencePiece model, when the LLM folder has one (the gguf backend writes it as is)
        **({"spm_model": str(Path(src.llm) / "tokenizer.model")} if (Path(src.llm) / "tokenizer.model").is_file() else {}),
        "files": {f: getattr(src, f) for f in FILE_FIELDS if getattr(src, f)},
        "prompt_source": prompt_source, "prompt_style": src.prompt_style,
        "default_backend": spec.default_backend, "keys": report,
        **({"detected": detected} if detected else {}),
    }
    return SourceModel(src.family, description, stack, llm, tok, pre, prompt, LLM_ARCH[spec.llm],
                       llm_loader=load_llm if defer_llm else None)


def _image_tokens(src: UpstreamSource, spec: FamilySpec) -> int:
    if spec.connector == "qformer":
        return src.qformer_dims.queries
    return (spec.image_size // src.vit_dims.patch) ** 2 // 4


def _load_vit(src: UpstreamSource, spec: FamilySpec, override: dict, report: dict):
    import torch

    d = src.vit_dims
    path = Path(src.vit)
    state = ck.model_state(ck.load_weights_file(path, "--vit", src.trust_checkpoint), path, "--vit")
    what = f"--vit {path}"
    renamed, used = ck.rename(state, eq.VIT_RENAMES, eq.vit_indices(d), what)
    q_name, v_name, dst = eq.VIT_QKV_BIAS
    for i in range(d.depth):
        q, v = state.get(q_name.format(i=i)), state.get(v_name.format(i=i))
        if q is None or v is None:
            raise CheckpointMismatch(what, missing=[n.format(i=i) for n, t in ((q_name, q), (v_name, v)) if t is None])
        renamed[dst.format(i=i)] = torch.cat([q.float(), torch.zeros_like(q, dtype=torch.float32), v.float()])
        used |= {q_name.format(i=i), v_name.format(i=i)}
    extra_blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")} - set(range(d.depth)))
    ignore = ({rf"blocks\.({'|'.join(map(str, extra_blocks))})\..*":
               f"ViT blocks beyond depth {d.depth} (MiniGPT-4 runs the first {d.depth})"} if extra_blocks else {})
    kr = ck.KeyReport()
    ck.check_unexpected(state, used, ignore, what, kr)
    grid = spec.image_size // d.patch
    renamed["embeddings.position_embedding"] = eq.resize_pos_embed(renamed["embeddings.position_embedding"], grid)
    if spec.connector == "qformer":  # ln_vision: BLIP-2's trained one (or the checkpoint's)
        blip2 = {**_blip2_state(src), **override}
        ln, _ = ck.rename(blip2, eq.LN_VISION_RENAMES, {}, f"--qformer {src.qformer}")
        renamed.update(ln)
    else:  # created, never loaded: LayerNorm(eps 1e-5) with weight 1, bias 0 (corrections 3)
        renamed["post_layernorm.weight"] = torch.ones(d.width)
        renamed["post_layernorm.bias"] = torch.zeros(d.width)
    vit = eq.vision_model(d, spec.image_size, d.ln_vision_eps)
    ck.load_into(vit, {k: v.float() for k, v in renamed.items()}, what)
    report["vit"] = {**kr.summary(), "blocks_run": d.depth, "blocks_in_file": d.depth + len(extra_blocks),
                     "pos_embed_grid": grid}
    return vit


_BLIP2_CACHE: dict = {}


def _blip2_state(src: UpstreamSource) -> dict:
    if not src.qformer:
        raise SourceError(f"{src.family} needs the BLIP-2 Q-Former file: pass --qformer blip2_pretrained_flant5xxl.pth")
    key = (src.qformer, src.trust_checkpoint)
    if key not in _BLIP2_CACHE:
        _BLIP2_CACHE.clear()
        path = Path(src.qformer)
        _BLIP2_CACHE[key] = ck.model_state(ck.load_weights_file(path, "--qformer", src.trust_checkpoint), path,
                                           "--qformer")
    return _BLIP2_CACHE[key]


def _load_qformer(src: UpstreamSource, override: dict, report: dict):
    d = src.qformer_dims
    state = {**_blip2_state(src), **override}
    _BLIP2_CACHE.clear()
    what = f"--qformer {src.qformer}"
    renamed, used = ck.rename(state, eq.QFORMER_RENAMES, eq.qformer_indices(d), what, prefix=eq.QFORMER_PREFIX)
    if "query_tokens" not in state:
        raise CheckpointMismatch(what, missing=["query_tokens"])
    used |= {"query_tokens", "ln_vision.weight", "ln_vision.bias"}
    kr = ck.KeyReport()
    ck.check_unexpected(state, used, eq.BLIP2_IGNORED, what, kr)
    qf = eq.qformer_model(d, src.vit_dims.width)
    ck.load_into(qf, {k: v.float() for k, v in renamed.items()}, what)
    query_tokens = state["query_tokens"].float()
    if tuple(query_tokens.shape) != (1, d.queries, d.hidden):
        raise CheckpointMismatch(what, hint=f"query_tokens is {tuple(query_tokens.shape)}, expected "
                                 f"(1, {d.queries}, {d.hidden})")
    report["qformer"] = {**kr.summary(), "overridden_by_ckpt": len(override)}
    return qf, query_tokens


def _load_llm(src: UpstreamSource, spec: FamilySpec, llm_part: dict, ckpt_path: Path):
    import torch

    from edge_vlm.families import upstream_llm

    folder = Path(src.llm)
    if not folder.is_dir():
        raise SourceError(f"--llm {folder} is not a folder (expected a transformers-format model folder)")
    load = upstream_llm.load_llama if spec.llm == "llama" else upstream_llm.load_phi2
    llm = load(folder, src.llm_dtype)
    tok = upstream_llm.load_tokenizer(folder)
    what = f"--ckpt {ckpt_path} (LLM part)"
    pairs, plain, newer = split_lora(llm_part)
    plain = {k: v for k, v in plain.items() if not k.endswith("rotary_emb.inv_freq")}
    report = {}
    n = llm.config.num_hidden_layers
    if spec.trained_norms:
        needed = [f"model.layers.{i}.{k}" for i in range(n) for k in NORM_KEYS] + ["model.final_layernorm.weight"]
        missing = [k for k in needed if k not in plain]
        unexpected = sorted(set(plain) - set(needed))
        if missing or unexpected:
            raise CheckpointMismatch(what, [LLM_PREFIXES[0] + k for k in missing],
                                     [LLM_PREFIXES[0] + k for k in unexpected],
                                     hint="TinyGPT-V checkpoints carry every layer's trained norms")
        ck.check_shapes(llm, plain, what)
        with torch.no_grad():
            for k, v in plain.items():
                llm.get_parameter(k).copy_(v.float())
        report["llm_norms_from_ckpt"] = len(plain)
    elif plain:
        raise CheckpointMismatch(what, unexpected=sorted(LLM_PREFIXES[0] + k for k in plain),
                                 hint=f"{src.family} keeps its LLM frozen: a checkpoint with LLM weights belongs to "
                                 "another family (--family auto detects it)")
    if spec.lora:
        if not pairs:
            raise CheckpointMismatch(what, missing=[f"{LLM_PREFIXES[0]}model.layers.*.self_attn.{t}.lora_{{A,B}}.weight"
                                                    for t in spec.lora.targets],
                                     hint=f"{src.family} needs its LoRA; without it the LLM is the plain base model "
                                     "(upstream's silent strict=False gave garbage here)")
        modules = [f"model.layers.{i}.self_attn.{t}" for i in range(n) for t in spec.lora.targets]
        alpha = src.lora_alpha if src.lora_alpha is not None else spec.lora.alpha
        report["lora"] = merge_lora(llm, pairs, modules, alpha, what)
        if newer:
            report["lora"]["note"] = "LoRA keys had peft>=0.3's '.default.' segment (upstream used peft 0.2.0)"
    elif pairs:
        raise CheckpointMismatch(what, unexpected=sorted(f"{LLM_PREFIXES[0]}{m}.lora_*" for m in pairs)[:8],
                                 hint=f"{src.family} has no LoRA: a checkpoint with LoRA is MiniGPT-v2 or TinyGPT-V "
                                 "(--family auto detects it)")
    return llm, tok, report
