"""`edge-vlm export`: source model -> validated bundle, one stage at a time, top to bottom."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from edge_vlm import limits
from edge_vlm.errors import BadInput, ExportError


@dataclass(frozen=True)
class ExportConfig:
    source: str | None = None  # built-in name, folder with edge-vlm-source.json (default: nano), or the folder
    # that the upstream files below are relative to
    upstream: dict = field(default_factory=dict)  # SOURCE_FIELDS: an upstream family's files and prompt overrides
    out: str = "bundle"
    backend: str = "auto"  # gguf | onnx | gptq | bnb | auto (see edge_vlm/backends.py)
    bits: int = 4
    quant: str | None = None  # gguf only: any llama.cpp type, overrides --bits
    group_size: int | None = None  # onnx MatMulNBits block size (default 32) / gptq group size (default 128)
    accuracy_level: int | None = None  # onnx MatMulNBits accuracy level
    int4_method: str | None = None  # onnx --bits 4: hqq (default) or rtn
    calibration: str | None = None  # gptq: "image" (the default) or "text" calibration sequences
    calibration_data: str | None = None  # gptq: easy-VQA-format folder (default: calibration_data/easy-vqa-sample)
    device: str = "auto"  # the device the bundle is meant for: auto | cpu | cuda
    force: bool = False
    threads: int = 0
    n_validate_tokens: int = 16
    # replaces the backend's quantized-agreement floor (recorded in the manifest). For models whose
    # logits carry no signal, e.g. `edge-vlm synth`'s random weights, where 4-bit noise flips near-tied
    # tokens; the check still runs and its result is in the bundle.
    min_agreement: float | None = None
    vision_precision: str | None = None  # fp32 | fp16 | int8 | auto; None: per device (export/vision_precision.py)
    vision_calibration: str | None = None  # folder of images for --vision-precision int8/auto

    def gguf_quant(self) -> str:
        from edge_vlm.export.llm_gguf import BITS_TO_QUANT

        if self.quant:
            return self.quant.upper()
        if self.bits not in BITS_TO_QUANT:
            raise BadInput(f"--bits {self.bits} is not supported by gguf: use 4, 8 or 16, or --quant TYPE")
        return BITS_TO_QUANT[self.bits]


# the recipe schema and its fields live in recipe.py; re-exported for the callers that import them from here
from edge_vlm.export.recipe import RECIPE_FIELDS, SOURCE_FIELDS, load_recipe  # noqa: E402,F401


LOSSLESS_ENOUGH = {"F32", "F16", "BF16", "Q8_0"}


def requant_note(source_quant: str | None, quant: str) -> str | None:
    """A source whose LLM was already quantized loses more when re-quantized to another grid."""
    if not source_quant or source_quant in ("F32", "F16", "BF16") or quant in LOSSLESS_ENOUGH | {source_quant}:
        return None
    return (f"note: the source LLM's weights are already {source_quant}; {quant} rounds them a second time. "
            f"--quant {source_quant} re-encodes them exactly (for the built-in model see "
            "benchmarks/results/nano-easyvqa-accuracy-linear-2026-11-22.md)")


COMMON_STAGES = ("load source", "vision -> ONNX", "validate vision", "vision precision", "load LLM")

VALIDATION_PROMPT = "Describe the image."


@dataclass
class ExportContext:
    """What every backend's `export_llm(ctx)` gets: the loaded source, the bundle being written,
    the torch reference session and a real image's embeddings to validate against."""

    cfg: ExportConfig
    src: object  # families' SourceModel
    bw: object  # BundleWriter
    ref_llm: object  # TorchLLMSession over src.llm
    image_embeds: object  # np.ndarray [n_image_tokens, n_embd] from the torch vision stack
    embed_image: Callable  # image path -> np.ndarray embeddings from the exported vision ONNX
    step: Callable[[str], None]  # announce the next stage (progress bar)
    llm_config: object = None  # the torch LLM's config (kept when the LLM itself is released)
    quant: str = ""  # gguf: the llama.cpp type
    validation_prompt: str = VALIDATION_PROMPT
    notes: list = field(default_factory=list)
    _trace: object = None

    def reference_trace(self):
        """The torch reference's greedy steps and logits on the validation input (recorded once)."""
        if self._trace is None:
            from edge_vlm.export.llm_validate import reference_trace

            self._trace = reference_trace(self.ref_llm, self.src.prompt, self.validation_prompt, self.image_embeds,
                                          self.cfg.n_validate_tokens)
        return self._trace

    def release_torch_llm(self) -> None:
        """Record the reference trace, then drop the torch LLM's weights (backends that no longer need
        them, before loading their own copy: peak memory is one model, not two)."""
        import gc

        self.reference_trace()
        self.src.llm = None
        self.ref_llm.model = self.ref_llm.embed = None
        gc.collect()


class LazyVision:
    """The exported vision ONNX, opened only when a backend asks for embeddings (gptq calibration):
    a 4 GB EVA ViT-g session is not kept resident through the LLM export."""

    def __init__(self, path: Path, spec, pre, threads: int):
        self.args, self.model = (path, spec, pre, ["CPUExecutionProvider"], threads), None

    def embed(self, image):
        if self.model is None:
            from edge_vlm.runtime.vision import VisionModel

            self.model = VisionModel(*self.args)
        return self.model.embed(image)

    def close(self):
        if self.model is not None:
            self.model.close()
            self.model = None


def pick_backend(cfg: ExportConfig, arch: str | None):
    from edge_vlm.backends import OPTION_FLAGS, check_options, choose

    if cfg.quant and cfg.backend not in ("auto", "gguf"):
        raise BadInput(f"--quant names a llama.cpp type; it cannot be used with --backend {cfg.backend}")
    requested = "gguf" if cfg.quant else cfg.backend
    backend, why = choose(requested, arch, None if cfg.quant else cfg.bits, cfg.device)
    check_options(backend, {k: getattr(cfg, k) for k in OPTION_FLAGS})
    return backend, why


def run(cfg: ExportConfig, progress: bool = True) -> Path:
    import gc

    from tqdm import tqdm

    from edge_vlm import __version__
    from edge_vlm.backends import exporter_module
    from edge_vlm.export.bundle import BundleWriter
    from edge_vlm.export import vision_precision
    from edge_vlm.export.llm_onnx import _for_cuda
    from edge_vlm.export.vision_onnx import VisionOnnxExporter
    from edge_vlm.export.vision_precision import VisionPrecisionConfig, calibration_images
    from edge_vlm.families import describe_source, load_source
    from pydantic import ValidationError

    from edge_vlm.manifest import Manifest, VisionSpec, describe_errors
    from edge_vlm.plan.shapes import llm_shape_of, vision_shape_of
    from edge_vlm.preprocess import preprocess
    from edge_vlm.reference import ReferencePipeline

    import torch

    # -o is checked first (a file in the way, a read-only folder): no model loads for an export that cannot land
    BundleWriter(Path(cfg.out), cfg.force).check()
    cfg = replace(cfg, threads=limits.threads(cfg.threads)[0])  # never more threads than cores
    if cfg.calibration not in (None, "image", "text"):
        raise BadInput(f"--calibration {cfg.calibration!r}: use image or text")
    pick_backend(cfg, None)  # an impossible flag combination fails before any work
    if cfg.quant or cfg.backend == "gguf":
        from edge_vlm.export import llm_gguf

        llm_gguf.quant_ftype(cfg.gguf_quant())
        if cfg.gguf_quant().upper() == "F32" and (cfg.upstream or {}).get("llm_dtype") == "float16":
            raise BadInput("--quant F32 from an fp16-loaded LLM would only widen fp16 values: use --bits 16 (F16), "
                           "or load the LLM with --llm-dtype float32")
    vcfg = VisionPrecisionConfig(cfg.vision_precision, "cuda" if _for_cuda(cfg.device) else "cpu",
                                 cfg.vision_calibration)
    vcfg.check()
    if vcfg.precision == "int8":
        calibration_images(vcfg.calibration, required=True)  # no images: fail before any work (auto skips int8)
    source_root, _ = describe_source(cfg.source, cfg.upstream)  # a missing source fails before any work
    bar = tqdm(total=len(COMMON_STAGES) + 1, desc="export", unit="stage", disable=not progress)
    begun = []
    stages = StageLog()

    def step(name: str):  # close the previous stage on the bar, open the next
        if begun:
            bar.update(1)
        begun.append(name)
        stages.begin(name)
        bar.set_postfix_str(name)

    with BundleWriter(Path(cfg.out), cfg.force) as bw:
        step("load source")
        src = load_source(cfg.source, cfg.upstream, defer_llm=True)  # upstream LLMs load after the vision export
        backend, why = pick_backend(cfg, src.llm_arch)
        tqdm.write(why, file=sys.stderr)
        exporter = exporter_module(backend)
        bar.total = len(COMMON_STAGES) + len(exporter.STAGES) + 1
        bar.refresh()
        step("vision -> ONNX")
        vx = VisionOnnxExporter()
        vision_file = "vision.onnx"
        fp32_file = vision_file if vcfg.precision == "fp32" else "vision.fp32.onnx"  # converted below
        vx.export(src.vision, src.preprocess.image_size, bw.path(fp32_file))
        step("validate vision")
        sample_image = _sample_image()
        p = src.preprocess
        pixels = preprocess(sample_image, p.image_size, p.mean, p.std, p.resize)
        vision_check = vx.validate(src.vision, bw.path(fp32_file), src.preprocess.image_size, pixels)
        with torch.no_grad():
            image_embeds = src.vision(torch.from_numpy(pixels))[0].float().numpy()
        vision_shape = vision_shape_of(src)
        image_sets = vision_precision.image_sets(src.vision, src.preprocess, sample_image, vcfg)
        src.vision = None  # exported and validated: its torch weights are not needed any more
        gc.collect()
        step("vision precision")
        precision = vision_precision.convert(bw.path(fp32_file), bw.path(vision_file), image_sets, vcfg, cfg.threads,
                                             log=lambda msg: tqdm.write(msg, file=sys.stderr))
        vision_check = {**vision_check, "precision": precision}
        step("load LLM")
        src.load_llm()
        ref = ReferencePipeline(src)
        llm_shape = llm_shape_of(src)
        spec = VisionSpec(file=vision_file, input_name=vx.input_name, output_name=vx.output_name,
                          n_image_tokens=src.description["image_tokens"], n_embd=src.llm.config.hidden_size,
                          shape=vision_shape, precision=precision["precision"],
                          built_for=vcfg.device if precision["precision"] == "fp16" else None)
        vision_rt = LazyVision(bw.path(vision_file), spec, src.preprocess, cfg.threads)
        ctx = ExportContext(cfg=cfg, src=src, bw=bw, ref_llm=ref.llm, image_embeds=image_embeds,
                            embed_image=vision_rt.embed, step=step, llm_config=src.llm.config,
                            quant=cfg.gguf_quant() if backend.name == "gguf" else "")
        try:
            llm_spec, llm_validation = exporter.export_llm(ctx)
        finally:
            vision_rt.close()
        if backend.name == "gguf":
            note = requant_note(src.description.get("llm_source_quant"), ctx.quant)
            if note:
                ctx.notes.append(note)
        for note in ctx.notes:
            tqdm.write(note, file=sys.stderr)
        llm_spec.shape = llm_shape
        step("write manifest")
        try:
            manifest = Manifest(
                family=src.family,
                source={**src.description, "path": str(source_root)},
                preprocess=src.preprocess,
                vision=spec,
                llm=llm_spec,
                prompt=src.prompt,
                edge_vlm_version=__version__,
                validation={"backend_choice": why, "vision": vision_check, **llm_validation,
                            **({"notes": ctx.notes} if ctx.notes else {}), "export_stages": stages.end()},
            )
        except ValidationError as e:  # a value the bundle's schema refuses (a name or template from the source)
            raise ExportError(f"the bundle's manifest would be invalid: {describe_errors(e)}; nothing was written. "
                              "Check the source's names, template and stop strings") from None
        out = bw.commit(manifest)
    bar.update(1)
    bar.close()
    return out


class StageLog:
    """Seconds and peak resident memory by the end of each export stage (the process's peak only grows, so
    the stage where it jumps is the one that needs the memory); recorded in the manifest's validation."""

    def __init__(self):
        self.rows, self.t0 = [], None

    def begin(self, name: str):
        self._close()
        self.rows.append({"stage": name})
        self.t0 = time.perf_counter()

    def _close(self):
        if self.rows and "seconds" not in self.rows[-1]:
            self.rows[-1].update(seconds=round(time.perf_counter() - self.t0, 1), peak_rss_mb=peak_rss_mb())

    def end(self) -> list[dict]:
        self._close()
        return self.rows


def peak_rss_mb() -> float:
    from edge_vlm.bench.worker import peak_rss_mb as vm_hwm  # /proc's VmHWM: this program's own peak

    return round(vm_hwm(), 1)


def _sample_image():
    """A real image for validation: an easy-VQA test image if installed, else a synthetic one."""
    try:
        from edge_vlm.data import dataset_dir

        return dataset_dir("easy-vqa", "test") / "images" / "0.png"
    except Exception:
        import numpy as np
        from PIL import Image

        x = np.zeros((64, 64, 3), np.uint8)
        x[16:48, 16:48] = (200, 30, 30)
        return Image.fromarray(x)
