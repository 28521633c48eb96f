"""`Pipeline`: a bundle loaded and ready to answer questions about images.

    with edge_vlm.Pipeline.load("nano-q4") as p:
        for piece in p.generate("cat.png", "what is in the image?"):
            print(piece, end="")

The gguf and onnx backends import only numpy, Pillow, onnxruntime, tokenizers and
llama-cpp-python (never torch or family code); gptq and bnb bundles run through torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from edge_vlm import limits
from edge_vlm.errors import BadInput, BundleError, EmbeddingSizeMismatch
from edge_vlm.manifest import load_manifest, verify_files
from edge_vlm.runtime import device as devices
from edge_vlm.runtime.generate import GenerationStats, generate
from edge_vlm.runtime.sampling import SamplingConfig


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    n_ctx: int | None = None  # None: 2048, or the model's trained context if smaller
    threads: int = 0  # 0 = all cores; more than the cores is capped (with a note)
    # once: sha256 of each file the first time it is loaded (remembered per path+size+mtime);
    # sha256: every time; size: sizes only (catches truncation, not bit flips)
    verify: str = "once"
    exact: bool = False  # llama.cpp F32 KV cache, no flash attention (used by equality tests)
    # same: the vision model runs where --device says; cpu: always on the CPU, so that an 8 GB GPU
    # holds only the LLM (EVA ViT-g in fp32 is 4.4 GB; it runs once per image)
    vision_device: str = "same"
    parallel: int = 1  # sequences one LLM context decodes together (gguf; the server's --parallel)

    def __post_init__(self):  # every flag checked before anything loads
        for name, value, allowed in (("device", self.device, ("auto", "cpu", "cuda")),
                                     ("verify", self.verify, ("once", "sha256", "size")),
                                     ("vision device", self.vision_device, ("same", "cpu"))):
            if value not in allowed:
                raise BadInput(f"{name} {value!r}: use one of {', '.join(allowed)}")
        limits.n_ctx(self.n_ctx)
        limits.threads(self.threads)
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or not 1 <= self.parallel <= 256:
            raise BadInput(f"parallel {self.parallel!r}: give a number of sequences from 1 to 256")

    def for_model(self, manifest) -> tuple["RuntimeConfig", list[str]]:
        """The config with the model's limits applied: a context that holds the image and fits the
        model's trained context, threads no more than the cores. Returns it with notes to print."""
        trained = manifest.llm.n_ctx_train or None
        n_ctx = self.n_ctx or min(limits.DEFAULT_N_CTX, trained or limits.DEFAULT_N_CTX)
        if trained and n_ctx > trained:
            raise BadInput(f"--n-ctx {n_ctx} is more than this model's context ({trained} tokens): use at most "
                           f"{trained}")
        least = manifest.vision.n_image_tokens + 2  # the image, one token of text and one of answer
        if n_ctx < least:
            raise BadInput(f"--n-ctx {n_ctx} cannot hold the image ({manifest.vision.n_image_tokens} tokens) and an "
                           f"answer: use at least {least} (default {min(limits.DEFAULT_N_CTX, trained or 1 << 30)})")
        threads, note = limits.threads(self.threads)
        return replace(self, n_ctx=n_ctx, threads=threads), [note] if note else []


@dataclass
class Result:
    text: str
    timings_ms: dict = field(default_factory=dict)
    stats: GenerationStats = field(default_factory=GenerationStats)


class Pipeline:
    def __init__(self, bundle: Path, manifest, vision, llm, plan):
        self.bundle, self.manifest, self.vision, self.llm, self.device = bundle, manifest, vision, llm, plan

    @classmethod
    def load(cls, bundle, config: RuntimeConfig = RuntimeConfig()) -> "Pipeline":
        from edge_vlm.runtime.vision import VisionModel

        bundle = Path(bundle)
        m = load_manifest(bundle)
        config, notes = config.for_model(m)
        verify_files(bundle, m, hashes=config.verify)
        from edge_vlm.backends import BACKENDS, runtime_module

        if m.llm.backend not in BACKENDS:
            raise BundleError(f"bundle uses LLM backend {m.llm.backend!r}, this edge-vlm knows "
                              f"{', '.join(BACKENDS)}: upgrade edge-vlm or re-export the bundle")
        if m.vision.n_embd != m.llm.n_embd:
            raise EmbeddingSizeMismatch(f"manifest: vision n_embd {m.vision.n_embd} != LLM n_embd {m.llm.n_embd}")
        backend = BACKENDS[m.llm.backend]
        runtime = runtime_module(backend)  # MissingPackage with the install command if its extra is absent
        plan = devices.resolve(config.device, backend.cuda_via)
        plan.notes.extend(notes)
        if config.vision_device == "cpu":
            plan.vision_providers = ["CPUExecutionProvider"]
        if m.vision.built_for == "cuda" and "CUDAExecutionProvider" not in plan.vision_providers:
            plan.notes.append("this bundle's vision model is an fp16 graph for CUDA; onnxruntime runs it on a CPU, "
                              "more slowly than fp32. For a CPU, export with --device cpu --vision-precision "
                              "fp16 (fp16 weights, fp32 compute) or int8")
        vision = VisionModel(bundle / m.vision.file, m.vision, m.preprocess, plan.vision_providers, config.threads)
        try:
            llm = runtime.open_session(bundle, m, config, plan)
        except BaseException:
            vision.close()
            raise
        if llm.n_embd != m.vision.n_embd:
            llm.close()
            raise EmbeddingSizeMismatch(f"LLM file has n_embd {llm.n_embd}, vision output is {m.vision.n_embd}")
        return cls(bundle, m, vision, llm, plan)

    def generate(self, image, prompt: str, sampling: SamplingConfig = SamplingConfig(),
                 stats: GenerationStats | None = None) -> Iterator[str]:
        """Stream the answer to `prompt` about `image` (path, bytes or PIL image) as text pieces."""
        limits.prompt_text(prompt)
        emb = self.vision.embed(image)
        yield from generate(self.llm, self.manifest.prompt, prompt, emb, sampling, stats)

    def answer(self, image, prompt: str, sampling: SamplingConfig = SamplingConfig(), on_piece=None) -> Result:
        """Run one request to completion, with timings (ms) for each stage."""
        limits.prompt_text(prompt)
        t0 = time.perf_counter()
        px = self.vision.pixels(image)
        t1 = time.perf_counter()
        emb = self.vision.embed_pixels(px)[0]
        t2 = time.perf_counter()
        stats = GenerationStats()
        pieces = []
        for piece in generate(self.llm, self.manifest.prompt, prompt, emb, sampling, stats):
            pieces.append(piece)
            if on_piece:
                on_piece(piece)
        t3 = time.perf_counter()
        first = stats.first_token or t3
        n = stats.generated_tokens
        decode_s = (stats.end or t3) - first
        timings = {"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": (t2 - t1) * 1e3,
                   "prefill_ms": ((stats.prefill_end or t3) - t2) * 1e3,
                   "ttft_ms": (first - t0) * 1e3, "total_ms": (t3 - t0) * 1e3,
                   # tokens after the first, over their time (the first token's cost is in ttft)
                   "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None}
        return Result("".join(pieces), timings, stats)

    def close(self):
        if self.llm is not None:
            self.llm.close()
            self.llm = None
        if self.vision is not None:
            self.vision.close()
            self.vision = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
