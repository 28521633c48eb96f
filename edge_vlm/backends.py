"""What each LLM backend can do, in one table, and how `--backend auto` chooses among them.

A backend is an export path (`exporter`: a module with `export_llm(ctx)`) plus a runtime path
(`runtime`: a module whose `open_session` returns an `LLMSession`). Everything the CLI says about backends — `edge-vlm
backends`, the reason `auto` gives, the error when none fits — is computed from this table.
Nothing here imports a backend's packages: installed-ness is checked with `find_spec`.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from edge_vlm.errors import BadInput, MissingPackage

# torch is pinned in every extra that needs it: an unpinned torch pulls a multi-GB CUDA build
INSTALL = {
    "gguf": "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36",
    "onnx": "pip install 'edge-vlm[cpu]'  (GPU: 'edge-vlm[gpu]', never both)",
    "bnb": "pip install torch==2.13.0 'edge-vlm[bnb]'",
    "gptq": "pip install torch==2.13.0 'edge-vlm[gptq]'",
    "export": "pip install torch==2.13.0 'edge-vlm[export]'",
}


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    bits: tuple[int, ...]
    devices: tuple[str, ...]
    archs: frozenset | None  # HF `model_type`s it can express; None = any torch decoder we can trace
    arch_note: str  # why an architecture outside `archs` is refused
    export_modules: tuple[str, ...]  # import names the export path needs (beyond torch/transformers)
    runtime_modules: tuple[str, ...]  # import names the runtime path needs
    runtime_needs_torch: bool
    exporter: str  # module with export_llm(ctx)
    runtime: str  # module with open_session(bundle, manifest, RuntimeConfig, DevicePlan) -> LLMSession
    cuda_via: str  # what must see a GPU for --device cuda: llama_cpp | onnxruntime | torch

    @property
    def install(self) -> str:
        return INSTALL[self.name]


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("gguf", "llama.cpp GGUF (k-quants / Q8_0 / F16); fastest on CPU, no torch at runtime",
            bits=(4, 8, 16), devices=("cpu", "cuda"), archs=frozenset({"llama"}),
            arch_note="edge-vlm writes GGUF for the llama architecture only (llama.cpp has no architecture "
                      "for TinyGPT-V's Phi-2 variant with QK-LayerNorm and post-attention RMSNorm)",
            export_modules=("gguf", "llama_cpp"), runtime_modules=("llama_cpp",), runtime_needs_torch=False,
            exporter="edge_vlm.export.llm_gguf", runtime="edge_vlm.runtime.llm_gguf",
            cuda_via="llama_cpp"),
    Backend("onnx", "ONNX decoder with KV cache; 4/8-bit MatMulNBits weights, 16-bit fp16 weights; any torch "
                    "decoder; onnxruntime (CPU EP, CUDA EP with onnxruntime-gpu), no torch at runtime",
            bits=(4, 8, 16), devices=("cpu", "cuda"), archs=None, arch_note="",
            export_modules=("onnx", "onnxscript", "onnx_ir", "onnxruntime"),
            runtime_modules=("onnxruntime", "tokenizers"), runtime_needs_torch=False,
            exporter="edge_vlm.export.llm_onnx", runtime="edge_vlm.runtime.llm_onnx",
            cuda_via="onnxruntime"),
    Backend("gptq", "GPTQModel 4/8-bit GPTQ, calibrated on image-conditioned sequences; runs through torch",
            bits=(4, 8), devices=("cpu", "cuda"), archs=frozenset({"llama"}),
            arch_note="GPTQModel quantizes the architectures it has a definition for; edge-vlm wires up llama",
            export_modules=("gptqmodel",), runtime_modules=("torch", "transformers", "gptqmodel"),
            runtime_needs_torch=True,
            exporter="edge_vlm.export.llm_gptq", runtime="edge_vlm.runtime.llm_torch",
            cuda_via="torch"),
    Backend("bnb", "bitsandbytes nf4 (double quant) / int8 transformers checkpoint; any transformers decoder; "
                   "runs through torch (slow on CPU, made for CUDA)",
            bits=(4, 8), devices=("cpu", "cuda"), archs=None, arch_note="",
            export_modules=("bitsandbytes",), runtime_modules=("torch", "transformers", "bitsandbytes"),
            runtime_needs_torch=True,
            exporter="edge_vlm.export.llm_bnb", runtime="edge_vlm.runtime.llm_torch",
            cuda_via="torch"),
)}

# `auto` takes the first usable backend: llama.cpp is the fastest runtime on CPU and GPU and needs no
# torch; ONNX Runtime is next (any architecture, no torch); the torch-based ones come last.
AUTO_ORDER = ("gguf", "onnx", "gptq", "bnb")


def missing_modules(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def gpu_visible(via: str) -> bool:
    from edge_vlm.runtime import device

    return {"llama_cpp": device.llama_has_gpu, "onnxruntime": device.ort_has_cuda,
            "torch": device.torch_has_cuda}[via]()


@dataclass(frozen=True)
class Verdict:
    backend: str
    usable: bool
    reason: str  # why not (or, when usable, what it will do)


def assess(b: Backend, arch: str | None, bits: int | None, device: str, for_export: bool = True) -> Verdict:
    """Can `b` export (or run) an `arch` model at `bits` for `device`? Checks in the order a user fixes them."""
    if arch is not None and b.archs is not None and arch not in b.archs:
        return Verdict(b.name, False, f"architecture {arch!r} not supported: {b.arch_note}")
    if bits is not None and bits not in b.bits:
        return Verdict(b.name, False, f"no {bits}-bit mode (has {', '.join(map(str, b.bits))})")
    if device != "auto" and device not in b.devices:
        return Verdict(b.name, False, f"does not run on {device}")
    gone = missing_modules(b.export_modules + b.runtime_modules if for_export else b.runtime_modules)
    if gone:
        return Verdict(b.name, False, f"not installed (missing {', '.join(gone)}): {b.install}")
    if device == "cuda" and not gpu_visible(b.cuda_via):
        return Verdict(b.name, False, f"{b.cuda_via} sees no CUDA GPU here")
    return Verdict(b.name, True, b.summary)


def choose(requested: str, arch: str | None, bits: int | None, device: str = "auto") -> tuple[Backend, str]:
    """The backend to export with, and a one-line reason. Raises BadInput listing every backend's reason."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise BadInput(f"unknown backend {requested!r}; known: {', '.join(BACKENDS)} or auto "
                           "(`edge-vlm backends` shows what each can do here)")
        v = assess(BACKENDS[requested], arch, bits, device)
        if not v.usable:
            raise BadInput(f"--backend {requested} cannot export this model: {v.reason}")
        return BACKENDS[requested], f"backend {requested} (requested)"
    verdicts = [assess(BACKENDS[n], arch, bits, device) for n in AUTO_ORDER]
    for v in verdicts:
        if v.usable:
            skipped = "; ".join(f"{w.backend}: {w.reason}" for w in verdicts[:verdicts.index(v)])
            return BACKENDS[v.backend], (f"backend auto -> {v.backend} for {arch} at {bits} bits"
                                         + (f" (skipped {skipped})" if skipped else ""))
    raise BadInput(f"no backend can export a {arch} model at {bits} bits for device {device}:\n"
                   + "\n".join(f"  {v.backend}: {v.reason}" for v in verdicts))


def runtime_module(b: Backend):
    """The runtime module of `b`, or MissingPackage with the install command."""
    gone = missing_modules(b.runtime_modules)
    if gone:
        raise MissingPackage(gone[0], b.install, f"this bundle's LLM runs on the {b.name} backend")
    return importlib.import_module(b.runtime)


def exporter_module(b: Backend):
    gone = missing_modules(b.export_modules)
    if gone:
        raise MissingPackage(gone[0], b.install, f"exporting with the {b.name} backend")
    return importlib.import_module(b.exporter)


def table(device: str = "auto") -> list[dict]:
    """One row per backend for `edge-vlm backends`: what it does and whether it works on this machine."""
    rows = []
    for b in BACKENDS.values():
        run_missing = missing_modules(b.runtime_modules)
        exp_missing = missing_modules(b.export_modules)
        v = assess(b, None, None, device)
        rows.append({"backend": b.name, "bits": list(b.bits), "devices": list(b.devices),
                     "architectures": sorted(b.archs) if b.archs else "any torch decoder",
                     "runtime_needs_torch": b.runtime_needs_torch,
                     "export_installed": not exp_missing, "runtime_installed": not run_missing,
                     "usable": v.usable, "why": v.reason, "install": b.install})
    return rows
