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

# torch is pinned in every command that installs it: an unpinned torch pulls a multi-GB CUDA build
LLAMA_INSTALL = ("CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON\" "
                 "pip install llama-cpp-python==0.3.36")
ORT_INSTALL = "pip install 'edge-vlm[cpu]' (or 'edge-vlm[gpu]'; never both)"

# ExportConfig fields that only some backends take, with their flags
OPTION_FLAGS = {"quant": "--quant", "group_size": "--group-size", "accuracy_level": "--accuracy-level",
                "int4_method": "--int4-method",
                "calibration": "--calibration", "calibration_data": "--calibration-data"}


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
    options: frozenset  # the OPTION_FLAGS fields this backend takes
    install_run: str  # what to install to run its bundles
    install_export: str  # what to install to export with it (export validates with the runtime too)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("gguf", "llama.cpp GGUF (k-quants / Q8_0 / F16); fastest on CPU, no torch at runtime",
            bits=(4, 8, 16), devices=("cpu", "cuda"), archs=frozenset({"llama"}),
            arch_note="edge-vlm writes GGUF for the llama architecture only (llama.cpp has no architecture "
                      "for TinyGPT-V's Phi-2 variant with QK-LayerNorm and post-attention RMSNorm)",
            export_modules=("gguf", "llama_cpp"), runtime_modules=("llama_cpp",), runtime_needs_torch=False,
            exporter="edge_vlm.export.llm_gguf", runtime="edge_vlm.runtime.llm_gguf",
            cuda_via="llama_cpp", options=frozenset({"quant"}), install_run=LLAMA_INSTALL,
            install_export=f"pip install torch==2.13.0 'edge-vlm[export]' and {LLAMA_INSTALL}"),
    Backend("onnx", "ONNX decoder with KV cache; 4-bit HQQ / 8-bit MatMulNBits weights, 16-bit fp16; a fused "
                    "graph for llama and TinyGPT-V's Phi-2, any other torch decoder traced; onnxruntime (CPU EP, "
                    "CUDA EP with onnxruntime-gpu), no torch at runtime",
            bits=(4, 8, 16), devices=("cpu", "cuda"), archs=None, arch_note="",
            export_modules=("onnx", "onnxscript", "onnx_ir", "onnxruntime"),
            runtime_modules=("onnxruntime", "tokenizers"), runtime_needs_torch=False,
            exporter="edge_vlm.export.llm_onnx", runtime="edge_vlm.runtime.llm_onnx",
            cuda_via="onnxruntime", options=frozenset({"group_size", "accuracy_level", "int4_method"}), install_run=ORT_INSTALL,
            install_export="pip install torch==2.13.0 'edge-vlm[export,cpu]'"),
    Backend("gptq", "GPTQModel 4/8-bit GPTQ, calibrated on image-conditioned sequences; runs through torch",
            bits=(4, 8), devices=("cpu", "cuda"), archs=frozenset({"llama"}),
            arch_note="GPTQModel quantizes the architectures it has a definition for; edge-vlm wires up llama",
            export_modules=("gptqmodel",), runtime_modules=("torch", "transformers", "gptqmodel"),
            runtime_needs_torch=True,
            exporter="edge_vlm.export.llm_gptq", runtime="edge_vlm.runtime.llm_torch",
            cuda_via="torch", options=frozenset({"group_size", "calibration", "calibration_data"}),
            install_run="pip install torch==2.13.0 'edge-vlm[gptq]'",
            install_export="pip install torch==2.13.0 'edge-vlm[export,gptq]'"),
    Backend("bnb", "bitsandbytes nf4 (double quant) / int8 transformers checkpoint; any transformers decoder; "
                   "runs through torch (slow on CPU, made for CUDA)",
            bits=(4, 8), devices=("cpu", "cuda"), archs=None, arch_note="",
            export_modules=("bitsandbytes",), runtime_modules=("torch", "transformers", "bitsandbytes"),
            runtime_needs_torch=True,
            exporter="edge_vlm.export.llm_bnb", runtime="edge_vlm.runtime.llm_torch",
            cuda_via="torch", options=frozenset(), install_run="pip install torch==2.13.0 'edge-vlm[bnb]'",
            install_export="pip install torch==2.13.0 'edge-vlm[export,bnb]'"),
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
    """Can `b` export (or, for_export=False, run) an `arch` model at `bits` for `device`? Checks in
    the order a user fixes them. An export for `cuda` needs no GPU here: bundles are portable."""
    if arch is not None and b.archs is not None and arch not in b.archs:
        return Verdict(b.name, False, f"architecture {arch!r} not supported: {b.arch_note}")
    if bits is not None and bits not in b.bits:
        return Verdict(b.name, False, f"no {bits}-bit mode (has {', '.join(map(str, b.bits))})")
    if device != "auto" and device not in b.devices:
        return Verdict(b.name, False, f"does not run on {device}")
    gone = missing_modules(b.export_modules + b.runtime_modules if for_export else b.runtime_modules)
    if gone:
        return Verdict(b.name, False, f"not installed (missing {', '.join(gone)}): "
                                      f"{b.install_export if for_export else b.install_run}")
    if not for_export and device == "cuda" and not gpu_visible(b.cuda_via):
        return Verdict(b.name, False, f"{b.cuda_via} sees no CUDA GPU here")
    return Verdict(b.name, True, b.summary)


def check_options(b: Backend, given: dict) -> None:
    """Refuse backend-specific options the chosen backend would silently ignore."""
    wrong = [k for k, v in given.items() if v is not None and k not in b.options]
    if wrong:
        takers = {k: [n for n, x in BACKENDS.items() if k in x.options] for k in wrong}
        raise BadInput("; ".join(f"{OPTION_FLAGS[k]} does not apply to the {b.name} backend (it is for "
                                 f"{', '.join(takers[k])}: pass --backend)" for k in wrong))


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
        raise MissingPackage(gone[0], b.install_run, f"this bundle's LLM runs on the {b.name} backend")
    return importlib.import_module(b.runtime)


def exporter_module(b: Backend):
    gone = missing_modules(b.export_modules)
    if gone:
        raise MissingPackage(gone[0], b.install_export, f"exporting with the {b.name} backend")
    return importlib.import_module(b.exporter)


def table(device: str = "auto") -> list[dict]:
    """One row per backend for `edge-vlm backends`: what it does and whether it can run bundles and
    export on this machine (a runtime-only box runs bundles it cannot make)."""
    rows = []
    for b in BACKENDS.values():
        run = assess(b, None, None, device, for_export=False)
        exp = assess(b, None, None, device, for_export=True)
        rows.append({"backend": b.name, "bits": list(b.bits), "devices": list(b.devices),
                     "architectures": sorted(b.archs) if b.archs else "any torch decoder",
                     "runtime_needs_torch": b.runtime_needs_torch, "options": sorted(OPTION_FLAGS[o] for o in b.options),
                     "can_run": run.usable, "can_export": exp.usable,
                     "why_not": None if run.usable and exp.usable else (exp.reason if run.usable else run.reason),
                     "install_run": b.install_run, "install_export": b.install_export})
    return rows
