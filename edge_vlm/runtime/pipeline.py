"""`Pipeline`: a bundle loaded and ready to answer questions about images.

    with edge_vlm.Pipeline.load("nano-q4") as p:
        for piece in p.generate("cat.png", "what is in the image?"):
            print(piece, end="")

The gguf and onnx backends import only numpy, Pillow, onnxruntime, tokenizers and
llama-cpp-python (never torch or family code); gptq and bnb bundles run through torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edge_vlm.errors import BundleError, EmbeddingSizeMismatch
from edge_vlm.manifest import load_manifest, verify_files
from edge_vlm.runtime import device as devices
from edge_vlm.runtime.generate import GenerationStats, generate
from edge_vlm.runtime.sampling import SamplingConfig


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    n_ctx: int = 2048
    threads: int = 0  # 0 = all cores
    # once: sha256 of each file the first time it is loaded (remembered per path+size+mtime);
    # sha256: every time; size: sizes only (catches truncation, not bit flips)
    verify: str = "once"
    exact: bool = False  # llama.cpp F32 KV cache, no flash attention (used by equality tests)
    # same: the vision model runs where --device says; cpu: always on the CPU, so that an 8 GB GPU
    # holds only the LLM (EVA ViT-g in fp32 is 4.4 GB; it runs once per image)
    vision_device: str = "same"


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
        if config.vision_device == "cpu":
            plan.vision_providers = ["CPUExecutionProvider"]
        elif config.vision_device != "same":
            from edge_vlm.errors import BadInput

            raise BadInput(f"vision device {config.vision_device!r}: use same or cpu")
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
        emb = self.vision.embed(image)
        yield from generate(self.llm, self.manifest.prompt, prompt, emb, sampling, stats)

    def answer(self, image, prompt: str, sampling: SamplingConfig = SamplingConfig(), on_piece=None) -> Result:
        """Run one request to completion, with timings (ms) for each stage."""
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
