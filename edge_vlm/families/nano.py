"""The built-in nano VLM: MiniGPT-4's method at a size a laptop CPU trains in minutes.

vision   EfficientNet-Lite0 (ImageNet, frozen) -> feature map [1280, S/32, S/32]
connector avg-pool `pool`x`pool` -> tokens in raster order -> concatenate `concat` consecutive
         tokens (MiniGPT-v2's row-major `.view`) -> the projector (trained): Linear(1280*concat -> n_embd),
         or LLaVA-1.5's two-layer MLP with GELU (`projector: mlp2x_gelu`); then, optionally, one "word
         token" per group of `words` (WordSlots): a small head on the pooled map picks among the group's
         words and the token is that choice (softmax) times the LLM's own embeddings of them
LLM      any HF causal LM transformers or edge_vlm.llms can load (built-in: SmolLM2-135M-Instruct,
         frozen); the gguf backend needs the llama architecture, onnx and bnb take any
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import CheckpointMismatch, SourceError
from edge_vlm.families.checkpoints import load_torch_file, model_state
from edge_vlm.families.resources import package_dir, resolve_file
from edge_vlm.families.source import SourceModel
from edge_vlm.manifest import Preprocess, PromptSpec

FEATURE_DIM = 1280  # EfficientNet-Lite head width (fixed by `fix_head_stem` for every width multiplier)
STRIDE = 32


@dataclass(frozen=True)
class NanoVisionConfig:
    encoder: str = "efficientnet-lite0"
    encoder_overrides: tuple = ()  # efficientnet global-param overrides, as (key, value) pairs
    image_size: int = 256
    pool: int = 2
    concat: int = 4
    projector: str = "linear"  # a key of PROJECTORS
    words: tuple = ()  # word-token groups (tuples of words), one image token each after the projected ones

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE // self.pool

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid // self.concat + len(self.words)

    def check(self):
        if self.image_size % (STRIDE * self.pool):
            raise SourceError(f"image_size {self.image_size} must be a multiple of {STRIDE * self.pool} (32 x pool)")
        if (self.grid * self.grid) % self.concat:
            raise SourceError(f"{self.grid}x{self.grid} pooled tokens do not split into groups of {self.concat}")


def build_encoder(cfg: NanoVisionConfig):
    package_dir("efficientnet_lite_pytorch")  # clear install hint if missing
    from efficientnet_lite_pytorch import EfficientNet

    enc = EfficientNet.from_name(cfg.encoder, image_size=cfg.image_size, **dict(cfg.encoder_overrides))
    return enc


def build_projector(kind: str, n_in: int, n_out: int):
    """The trained connector: the keys of PROJECTORS, as the source's `vision.projector` names them."""
    from torch import nn

    layers = {"linear": lambda: nn.Linear(n_in, n_out),
              # LLaVA-1.5's mlp2x_gelu: Linear -> GELU -> Linear, hidden width = the LLM's
              "mlp2x_gelu": lambda: nn.Sequential(nn.Linear(n_in, n_out), nn.GELU(), nn.Linear(n_out, n_out))}
    if kind not in layers:
        raise SourceError(f"unknown projector {kind!r}; known: {sorted(layers)}")
    return layers[kind]()


PROJECTORS = ("linear", "mlp2x_gelu")
WORD_HEAD_HIDDEN = 512


def word_slots_class():
    import torch
    from torch import nn

    class WordSlots(nn.Module):
        """One image token per word group. A head reads the pooled feature map (mean and max over positions:
        where a shape is does not matter) and scores each group's words; the token is the softmax of those
        scores times the LLM's input embeddings of the words (`embeddings`, fixed when trained and stored with
        the projection). So the LLM meets the image's colour and shape as its own words, which a question's
        words can be compared with; the projected tokens still carry the rest."""

        def __init__(self, groups: tuple, n_embd: int):
            super().__init__()
            self.sizes = [len(g) for g in groups]
            self.head = nn.Sequential(nn.Linear(2 * FEATURE_DIM, WORD_HEAD_HIDDEN), nn.GELU(),
                                      nn.Linear(WORD_HEAD_HIDDEN, sum(self.sizes)))
            self.register_buffer("embeddings", torch.zeros(sum(self.sizes), n_embd))

        def logits(self, feats: "torch.Tensor") -> "torch.Tensor":
            """feats [B, n, FEATURE_DIM*concat] (the projector's input) -> [B, sum of group sizes]."""
            t = feats.reshape(feats.shape[0], -1, FEATURE_DIM)
            return self.head(torch.cat([t.mean(1), t.amax(1)], -1))

        def forward(self, feats: "torch.Tensor") -> "torch.Tensor":
            scores, out, start = self.logits(feats), [], 0
            for n in self.sizes:  # slices, not split(): the ONNX exporter's folding pass warns about Split
                out.append(torch.softmax(scores[:, start:start + n], -1) @ self.embeddings[start:start + n])
                start += n
            return torch.stack(out, 1)

    return WordSlots


def word_embeddings(llm, tok, groups: tuple) -> "torch.Tensor":
    """The LLM's input embedding of each word as it follows a space (the mean where it takes several tokens)."""
    import torch

    table = llm.get_input_embeddings().weight
    with torch.no_grad():
        return torch.stack([table[tok(" " + w, add_special_tokens=False).input_ids].mean(0)
                            for g in groups for w in g]).clone()


def vision_stack_class():
    import torch
    from torch import nn

    class NanoVisionStack(nn.Module):
        """pixels [B,3,S,S] -> image embeddings [B, n_image_tokens, n_embd]."""

        def __init__(self, cfg: NanoVisionConfig, n_embd: int):
            super().__init__()
            self.cfg = cfg
            self.encoder = build_encoder(cfg)
            self.proj = build_projector(cfg.projector, FEATURE_DIM * cfg.concat, n_embd)
            self.words = word_slots_class()(cfg.words, n_embd) if cfg.words else None

        def connect(self, feats: "torch.Tensor") -> "torch.Tensor":
            """The trained connector: features -> image embeddings (projected tokens, then word tokens)."""
            x = self.proj(feats)
            return torch.cat([x, self.words(feats)], 1) if self.words is not None else x

        def features(self, pixels: "torch.Tensor") -> "torch.Tensor":
            """Frozen part: [B, n_image_tokens, 1280*concat] (what `align` precomputes)."""
            f = self.encoder.extract_features(pixels)
            if self.cfg.pool > 1:
                f = nn.functional.avg_pool2d(f, self.cfg.pool)
            b = f.shape[0]
            tokens = f.flatten(2).transpose(1, 2)  # [B, grid*grid, 1280], raster order
            return tokens.reshape(b, -1, FEATURE_DIM * self.cfg.concat)

        def forward(self, pixels):
            return self.connect(self.features(pixels))

    return NanoVisionStack


def _load_strict(module, state: dict, what: str, ignore_prefixes=()):
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointMismatch(what, missing, unexpected)
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointMismatch(what, hint="shape mismatch: " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}" for k in bad[:6]))
    module.load_state_dict(state)


def load_llm(root: Path, spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_vlm.llms import register_architectures

    register_architectures()
    if "gguf" in spec:
        f = resolve_file(root, spec["gguf"], "llm.gguf")
        kw = {"gguf_file": f.name}
        where = f.parent
    elif "hf_dir" in spec:
        where, kw = resolve_file(root, spec["hf_dir"], "llm.hf_dir"), {}
    else:
        raise SourceError("source 'llm' needs 'gguf' or 'hf_dir'")
    from edge_vlm.logs import no_gguf_progress_bar

    try:
        with no_gguf_progress_bar():
            tok = AutoTokenizer.from_pretrained(where, **kw)
            llm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load the LLM from {where}: {e}") from e
    llm.eval().requires_grad_(False)
    return llm, tok


def load(root: Path, desc: dict, with_projection: bool = True) -> SourceModel:
    """Load a nano source; a malformed description or unreadable file is a SourceError naming it."""
    try:
        return _load(root, desc, with_projection)
    except (KeyError, TypeError) as e:
        raise SourceError(f"{root / 'edge-vlm-source.json'} is incomplete or malformed: {type(e).__name__} {e} "
                          "(see edge_vlm/models/nano/edge-vlm-source.json for a complete example)") from e


def describe(root: Path, desc: dict):
    """The description as source_schema's typed NanoSource (types, ranges, template checked)."""
    from edge_vlm.families.source_schema import NanoSource, parse_source  # it reads STRIDE from here: no cycle

    d = parse_source(desc, str(root / "edge-vlm-source.json"))
    if not isinstance(d, NanoSource):
        raise SourceError(f"{root / 'edge-vlm-source.json'}: family {d.family!r} is not nano")
    return d


def vision_config(v) -> NanoVisionConfig:
    """source_schema.NanoVision -> the config the encoder is built from (checked before any weights load)."""
    overrides = v.encoder_overrides.model_dump(exclude_none=True)
    cfg = NanoVisionConfig(encoder=v.encoder, encoder_overrides=tuple(sorted(overrides.items())),
                           image_size=v.image_size, pool=v.pool, concat=v.concat, projector=v.projector,
                           words=tuple(tuple(g) for g in v.words))
    cfg.check()
    return cfg


def _load(root: Path, desc: dict, with_projection: bool) -> SourceModel:
    d = describe(root, desc)
    v = d.vision
    cfg = vision_config(v)
    llm_spec = d.llm.model_dump(exclude_none=True)
    llm, tok = load_llm(root, llm_spec)
    source_quant = gguf_weight_type(resolve_file(root, llm_spec["gguf"], "llm.gguf")) if d.llm.gguf else None
    if d.llm.adapter is not None:
        from edge_vlm.llms import lora

        lora.merge(llm, resolve_file(root, _ref(d.llm.adapter), "llm.adapter"))
        source_quant = None  # merged weights are off the source's quantization grid
    n_embd = llm.config.hidden_size
    stack = vision_stack_class()(cfg, n_embd)
    enc_path = resolve_file(root, _ref(v.encoder_weights), "vision.encoder_weights")
    enc_state = model_state(load_torch_file(enc_path, "vision.encoder_weights"), enc_path,
                            "vision.encoder_weights")
    _load_strict(stack.encoder, enc_state, f"encoder weights {enc_path}")
    if with_projection:
        from safetensors.torch import load_file

        p = resolve_file(root, _ref(d.projection), "projection")
        try:
            weights = load_file(str(p))
        except Exception as e:  # safetensors raises its own untyped errors for damaged files
            raise SourceError(f"projection {p} is not a readable safetensors file ({e}); retrain or restore it") from e
        words = {k[len("words."):]: t for k, t in weights.items() if k.startswith("words.")}
        # word-token weights in a file whose source declares no `vision.words` are reported as unexpected
        _load_strict(stack.proj, weights, f"projection {p}", ("words.",) if stack.words is not None else ())
        if stack.words is not None:
            _load_strict(stack.words, words, f"projection {p} (word tokens, keys words.*)")
    stack.eval().requires_grad_(False)
    pre = Preprocess(image_size=cfg.image_size, mean=list(v.mean), std=list(v.std), resize=v.resize)
    prompt = PromptSpec(**d.prompt.model_dump())
    return SourceModel("nano", {"name": d.name or root.name, "description": d.description or "",
                                "image_tokens": cfg.n_image_tokens,
                                # llama.cpp's pre-tokenizer name; SmolLM2's byte-level BPE is "smollm"
                                "tokenizer_pre": d.llm.tokenizer_pre,
                                # the LLM's weights were already quantized (e.g. a Q4_1 GGUF): recorded so
                                # export can warn that other types round them a second time
                                "llm_source_quant": source_quant},
                       stack, llm, tok, pre, prompt, llm.config.model_type)


def _ref(ref):
    """A FileRef as resources.resolve_file takes it: a path string or {'package', 'path'}."""
    return ref if isinstance(ref, str) else ref.model_dump()


def gguf_weight_type(path: Path) -> str:
    """The type holding most of a GGUF's weights (what it was quantized to)."""
    import gguf

    counts = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(counts, key=counts.get)
