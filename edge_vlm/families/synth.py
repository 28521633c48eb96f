"""`edge-vlm synth`: an upstream family's files, in exactly the upstream layouts, with seeded random
weights: full size (speed and memory depend on shapes, not values) or miniature (tests).

Written per model: `eva_vit_g.pth` (flat, fp16, one block more than the model runs),
`blip2_pretrained_flant5xxl.pth` (`{'model': query_tokens, ln_vision, Qformer.bert.*, t5_proj,
position_ids}`; Q-Former families), the family's training checkpoint (`{'model', 'optimizer',
'epoch'}`, trainable tensors only, PEFT-prefixed LoRA and norms), an HF LLM folder (Llama, or
old-format Phi-2 for TinyGPT-V; safetensors shards of at most 2 GB) and an `edge-vlm-source.json`
so that `edge-vlm export DIR` loads it. Upstream key names are produced by inverting the rename
tables of `eva_qformer` (tests check them against an independent forward written from the
upstream names in families.md).

The only tokenizer available offline is SmolLM2's (byte-level BPE, 49,152 tokens): it stands in
for LLaMA's and Phi-2's. Llama vocabularies grow from 32,000 to 49,152 rows to hold it (recorded).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edge_vlm.errors import BadInput
from edge_vlm.families import eva_qformer as eq


@dataclass(frozen=True)
class LLMDims:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048


@dataclass(frozen=True)
class SynthShape:
    family: str  # a key of minigpt.FAMILIES
    ckpt_name: str  # the released checkpoint's file name
    llm_dir: str
    llm: LLMDims
    vit: eq.VitDims = field(default_factory=eq.VitDims)
    qformer: eq.QFormerDims = field(default_factory=eq.QFormerDims)
    proj_mid: int = 4096  # TinyGPT-V: llama_proj's width (MiniGPT-4 7B's), then llama_proj2 -> Phi-2
    lora_r: int = 64
    init_std: float = 0.02  # transformers' initializer_range
    llm_dtype: str = "float16"  # released LLM folders are fp16


VICUNA_7B = LLMDims(4096, 32, 32, 11008, 32000)
VICUNA_13B = LLMDims(5120, 40, 40, 13824, 32000)
PHI_2 = LLMDims(2560, 32, 32, 10240, 51200)
SHAPES = {
    "minigpt4-7b": SynthShape("minigpt4", "pretrained_minigpt4_7b.pth", "vicuna-7b", VICUNA_7B),
    "minigpt4-13b": SynthShape("minigpt4", "pretrained_minigpt4.pth", "vicuna-13b", VICUNA_13B),
    "minigpt4-llama2": SynthShape("minigpt4-llama2", "pretrained_minigpt4_llama2_7b.pth", "Llama-2-7b-chat-hf",
                                  VICUNA_7B),
    "minigpt-v2": SynthShape("minigpt-v2", "minigptv2_checkpoint.pth", "Llama-2-7b-chat-hf", VICUNA_7B),
    "tinygpt-v": SynthShape("tinygpt-v", "TinyGPT-V_for_Stage3.pth", "phi-2", PHI_2),
    "tinygpt-v-stage4": SynthShape("tinygpt-v-stage4", "TinyGPT-V_for_Stage4.pth", "phi-2", PHI_2),
}
# miniature: every layout and key name as above, small widths and depths (tests)
MINI = dict(vit=eq.VitDims(width=32, depth=2, heads=2, mlp=64), qformer=eq.QFormerDims(
    hidden=32, layers=3, heads=2, intermediate=64, queries=4), proj_mid=48, lora_r=4, init_std=0.2,
    llm_dtype="float32")
MINI_LLM = LLMDims(64, 2, 4, 128, 0, 512)


def shape_for(name: str, size: str = "full") -> SynthShape:
    if name not in SHAPES:
        raise BadInput(f"unknown synth model {name!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[name]
    if size == "mini":
        return replace(s, llm=MINI_LLM, **MINI)
    if size != "full":
        raise BadInput(f"--size {size!r}: use full or mini")
    return s


class _Rand:
    """Seeded values: weights ~ N(0, std), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.02)."""

    def __init__(self, seed: int, std: float, dtype):
        import torch

        self.g = torch.Generator().manual_seed(seed)
        self.std, self.dtype = std, dtype

    def __call__(self, name: str, shape, kind: str | None = None):
        import torch

        kind = kind or ("norm" if any(s in name.lower() for s in ("norm", "ln_vision")) and name.endswith("weight")
                        else "bias" if name.endswith(("bias", "_bias")) else "weight")
        t = torch.randn(tuple(shape), generator=self.g)
        t = 1 + 0.1 * t if kind == "norm" else t * (0.02 if kind == "bias" else self.std)
        return t.to(self.dtype)


def _module_shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _inverse(table, indices: dict, prefix: str = "") -> dict:
    """dst (our module) name -> src (upstream) name."""
    out = {}
    for row in table:
        for i in (indices.get(row.per, []) if row.per else [None]):
            out[row.dst.format(i=i) if i is not None else row.dst] = prefix + (row.src.format(i=i) if i is not None
                                                                               else row.src)
    return out


def vit_state(s: SynthShape, rand) -> dict:
    import torch

    d = replace(s.vit, depth=s.vit.depth + 1)  # the file holds one block more than the model runs
    with torch.device("meta"):
        shapes = _module_shapes(eq.vision_model(d, d.weights_size, d.ln_vision_eps))
    names = _inverse(eq.VIT_RENAMES, eq.vit_indices(d))
    state = {src: rand(src, shapes[dst]) for dst, src in names.items()}
    for i in range(d.depth):
        for n in eq.VIT_QKV_BIAS[:2]:
            state[n.format(i=i)] = rand(n.format(i=i), (d.width,), "bias")
    return {k: v.half() for k, v in state.items()}  # eva_vit_g.pth is fp16 (corrections 2)


def blip2_state(s: SynthShape, rand) -> dict:
    import torch

    d = s.qformer
    with torch.device("meta"):
        shapes = _module_shapes(eq.qformer_model(d, s.vit.width))
    names = _inverse(eq.QFORMER_RENAMES, eq.qformer_indices(d), eq.QFORMER_PREFIX)
    state = {src: rand(src, shapes[dst]) for dst, src in names.items()}
    state["query_tokens"] = rand("query_tokens", (1, d.queries, d.hidden))
    state["ln_vision.weight"] = rand("ln_vision.weight", (s.vit.width,), "norm")
    state["ln_vision.bias"] = rand("ln_vision.bias", (s.vit.width,), "bias")
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # a buffer that survives saving
    state["t5_proj.weight"] = rand("t5_proj.weight", (64, d.hidden))  # BLIP-2's T5 projection, unused (shrunk)
    state["t5_proj.bias"] = rand("t5_proj.bias", (64,))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def ckpt_state(s: SynthShape, rand, llm_width: int, n_layers: int) -> dict:
    from edge_vlm.families.minigpt import FAMILIES, LLM_PREFIXES, NORM_KEYS

    spec = FAMILIES[s.family]
    widths_in = s.qformer.hidden if spec.connector == "qformer" else 4 * s.vit.width
    outs = [s.proj_mid, llm_width] if len(spec.projections) == 2 else [llm_width]
    state = {}
    for name, out in zip(spec.projections, outs):
        state[f"{name}.weight"] = rand(name + ".weight", (out, widths_in))
        state[f"{name}.bias"] = rand(name + ".bias", (out,))
        widths_in = out
    peft = LLM_PREFIXES[0]
    if spec.lora:
        for i in range(n_layers):
            for t in spec.lora.targets:
                out = {"query_key_value": 3 * llm_width}.get(t, llm_width)
                m = f"{peft}model.layers.{i}.self_attn.{t}"
                state[f"{m}.lora_A.weight"] = rand(m, (s.lora_r, llm_width))
                state[f"{m}.lora_B.weight"] = rand(m, (out, s.lora_r))  # trained: B is not zero
    if spec.trained_norms:
        sizes = {"self_attn.q_layernorm.weight": _head_dim(s), "self_attn.k_layernorm.weight": _head_dim(s)}
        for i in range(n_layers):
            for k in NORM_KEYS:
                state[f"{peft}model.layers.{i}.{k}"] = rand(k, (sizes.get(k, llm_width),), "norm")
        state[f"{peft}model.final_layernorm.weight"] = rand("final_layernorm.weight", (llm_width,), "norm")
    return {k: v.float() for k, v in state.items()}  # trainable parameters are saved in fp32


def _head_dim(s: SynthShape) -> int:
    return s.llm.hidden // s.llm.heads


def _llm_module(s: SynthShape, vocab: int, tokenizer):
    """An empty (meta) model with the LLM folder's names and shapes, and its config.json."""
    import torch

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    d = s.llm
    if s.family.startswith("tinygpt"):
        from edge_vlm.llms.phi_qknorm import TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM

        cfg = TinyGPTVPhiConfig(vocab_size=vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
                                num_hidden_layers=d.layers, num_attention_heads=d.heads,
                                max_position_embeddings=d.max_positions, **ids)
        with torch.device("meta"):
            m = TinyGPTVPhiForCausalLM(cfg)
        config = {"model_type": "phi", "architectures": ["PhiForCausalLM"], "vocab_size": vocab,
                  "hidden_size": d.hidden, "intermediate_size": d.intermediate, "num_hidden_layers": d.layers,
                  "num_attention_heads": d.heads, "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
                  "layer_norm_eps": 1e-5, "hidden_act": "gelu_new", "max_position_embeddings": d.max_positions,
                  "tie_word_embeddings": False, "torch_dtype": s.llm_dtype, **ids}
        # TinyGPT-V's added norms are in no Phi-2 file (they come from the stage checkpoint)
        skip = ("q_layernorm", "k_layernorm", "post_layernorm")
        return m, config, skip
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
                      num_hidden_layers=d.layers, num_attention_heads=d.heads, num_key_value_heads=d.heads,
                      max_position_embeddings=d.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False, **ids)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    config = {**cfg.to_dict(), "torch_dtype": s.llm_dtype}
    return m, config, ()


SHARD_BYTES = 2 << 30


def write_llm_folder(s: SynthShape, folder: Path, rand, tokenizer) -> dict:
    from safetensors.torch import save_file

    vocab = max(s.llm.vocab, len(tokenizer))
    m, config, skip = _llm_module(s, vocab, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(folder)
    shapes = {k: v for k, v in _module_shapes(m).items() if not any(x in k for x in skip)}
    shards, cur, cur_bytes = [], {}, 0
    itemsize = 2 if s.llm_dtype == "float16" else 4
    for name, shape in shapes.items():
        n = itemsize
        for x in shape:
            n *= x
        if cur and cur_bytes + n > SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = shape
        cur_bytes += n
    shards.append(cur)
    weight_map = {}
    for j, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: rand(k, shp).contiguous() for k, shp in names.items()}, str(folder / fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                        indent=1))
    return {"vocab": vocab, "shards": len(shards)}


def write(name: str, out: Path, size: str = "full", seed: int = 0, tokenizer=None, progress=None) -> Path:
    """Write model `name` (a key of SHAPES) at `size` into `out`; returns `out`."""
    import torch

    from edge_vlm.families.minigpt import FAMILIES

    s = shape_for(name, size)
    spec = FAMILIES[s.family]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from edge_vlm.families.resources import smollm2_tokenizer

        tokenizer = smollm2_tokenizer()
    step = progress or (lambda msg: None)
    step("ViT")
    torch.save(vit_state(s, _Rand(seed, s.init_std, torch.float32)), out / "eva_vit_g.pth")
    desc = {"family": s.family, "name": f"synth-{name}" + ("-mini" if size == "mini" else ""),
            "vit": "eva_vit_g.pth", "ckpt": s.ckpt_name, "llm": s.llm_dir, "tokenizer_pre": "smollm",
            "synth": {"seed": seed, "size": size, "note": "seeded random weights in the upstream layout "
                      "(edge-vlm synth); SmolLM2's tokenizer stands in for the family's"}}
    if spec.connector == "qformer":
        step("Q-Former")
        torch.save({"model": blip2_state(s, _Rand(seed + 1, s.init_std, torch.float32))},
                   out / "blip2_pretrained_flant5xxl.pth")
        desc["qformer"] = "blip2_pretrained_flant5xxl.pth"
    step("LLM")
    dtype = getattr(torch, s.llm_dtype)
    info = write_llm_folder(s, out / s.llm_dir, _Rand(seed + 2, s.init_std, dtype), tokenizer)
    step("checkpoint")
    model = ckpt_state(s, _Rand(seed + 3, s.init_std, torch.float32), s.llm.hidden, s.llm.layers)
    first = next(iter(model.values()))
    optimizer = {"state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(first),
                               "exp_avg_sq": torch.zeros_like(first)}},
                 "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0]}]}
    torch.save({"model": model, "optimizer": optimizer, "epoch": 4, "scaler": None}, out / s.ckpt_name)
    if size == "mini":
        desc["vit_dims"] = asdict(s.vit)
        desc["qformer_dims"] = asdict(s.qformer)
    desc["synth"]["llm_vocab"] = info["vocab"]
    desc["synth"]["proj_mid"] = s.proj_mid
    (out / "edge-vlm-source.json").write_text(json.dumps(desc, indent=2) + "\n")
    return out
