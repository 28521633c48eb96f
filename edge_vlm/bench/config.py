"""What `edge-vlm bench` measures and on what: typed, so the CLI, scripts and tests share one shape."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPT = "Describe the image in detail."


@dataclass(frozen=True)
class TargetSpec:
    """One thing to measure: a bundle folder, or a source run by the torch reference (fp32, as the
    upstream demos run it)."""

    label: str
    kind: str  # bundle | reference
    path: str  # bundle folder, or source (built-in name / source folder)
    device: str = "cpu"
    threads: int = 0
    n_ctx: int | None = None  # None: 2048, or the model's trained context if smaller
    vision_device: str = "same"
    llm_dtype: str = "float32"  # the reference's LLM: float32, or float16 as the upstream demos run it


@dataclass(frozen=True)
class BenchConfig:
    bundles: tuple[str, ...] = ()
    reference: str | None = None  # source for the torch reference; measured first, the baseline of ratios
    reference_dtype: str = "float32"  # float16 for models whose fp32 reference does not fit in RAM
    dataset: str | None = None  # easy-vqa or a folder in its format; None = no task accuracy
    split: str = "test"
    limit: int = 100  # questions for task accuracy
    runs: int = 5  # timed runs per target, after `warmup`
    warmup: int = 1
    max_new_tokens: int = 32  # generated per timed run, EOS and stop strings ignored
    prompt: str = DEFAULT_PROMPT
    image: str | None = None  # default: a fixed easy-VQA test image (or a synthetic one)
    fidelity_cases: int = 4  # images x prompts for fidelity (needs --reference)
    fidelity_tokens: int = 32
    mode: str = "auto"  # interleaved | sequential | auto (interleaved when every target fits in RAM at once)
    device: str = "cpu"
    vision_device: str = "same"
    threads: int = 0
    n_ctx: int | None = None  # None: 2048, or the model's trained context if smaller
    name: str = "bench"
    out_dir: str = "benchmarks/results"
    planner: bool = True  # predict each target's peak RSS and report the planner's error
    labels: tuple[str, ...] = field(default_factory=tuple)  # display names, one per bundle (default: folder names)
