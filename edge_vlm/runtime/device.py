"""Where each component runs: `--device auto|cpu|cuda` resolved against what is installed.

The vision model always runs on onnxruntime; the LLM runs on whatever its backend uses
(`via`: llama_cpp, onnxruntime or torch), so each is checked for a GPU on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edge_vlm.errors import DeviceUnavailable

ORT_GPU_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
                "(on Jetson: the onnxruntime-gpu wheel for your JetPack, see README)")
GPU_HINTS = {
    "onnxruntime": f"onnxruntime has no CUDA provider: {ORT_GPU_HINT}",
    "llama_cpp": 'llama-cpp-python was built without GPU offload: CMAKE_ARGS="-DGGML_CUDA=on" pip install '
                 "--force-reinstall --no-cache-dir llama-cpp-python==0.3.36",
    "torch": "torch sees no CUDA device: install a CUDA build of torch 2.13.0 for your driver",
}
LLAMA_GPU_HINT = GPU_HINTS["llama_cpp"]


@dataclass
class DevicePlan:
    vision_providers: list[str]
    llm_on_gpu: bool
    notes: list[str] = field(default_factory=list)

    @property
    def llm_gpu_layers(self) -> int:  # llama.cpp's n_gpu_layers: -1 = all
        return -1 if self.llm_on_gpu else 0

    @property
    def llm_providers(self) -> list[str]:  # onnxruntime execution providers for an ONNX LLM
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.llm_on_gpu else ["CPUExecutionProvider"]

    @property
    def torch_device(self) -> str:
        return "cuda" if self.llm_on_gpu else "cpu"

    @property
    def summary(self) -> str:
        return (f"vision on {'CUDA' if 'CUDAExecutionProvider' in self.vision_providers else 'CPU'}, "
                f"LLM on {'CUDA' if self.llm_on_gpu else 'CPU'}")


def ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # loading the vision model then says what to install
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


_CUDA_LIBS_LOADED = False


def load_cuda_libraries(providers) -> None:
    """Before onnxruntime's first CUDA session: load the CUDA and cuDNN libraries that
    `pip install onnxruntime-gpu[cuda,cudnn]` put in the environment (onnxruntime does not find them
    by itself). Not needed where torch was imported first (it has loaded its own) or where the
    libraries are on the loader's path; onnxruntime's messages go to the log, not the terminal."""
    global _CUDA_LIBS_LOADED
    if _CUDA_LIBS_LOADED or "CUDAExecutionProvider" not in providers:
        return
    _CUDA_LIBS_LOADED = True
    import contextlib
    import io
    import logging
    import sys

    import onnxruntime as ort

    if "torch" in sys.modules or not hasattr(ort, "preload_dlls"):
        return
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            ort.preload_dlls()
    except Exception as e:  # a missing folder or library: the CUDA provider then says what failed
        said.write(str(e))
    if said.getvalue().strip():
        logging.getLogger("edge_vlm").debug("onnxruntime.preload_dlls: %s", said.getvalue().strip())


# onnxruntime's CUDA arena grows by powers of two unless told otherwise; growing by what is asked held 62 MiB less
# after loading a tiny bundle on an H200 (benchmarks/results/gpu-h200.md). On an 8 GB card headroom is what counts.
CUDA_PROVIDER_OPTIONS = {"arena_extend_strategy": "kSameAsRequested"}


def ort_providers(names) -> list:
    """The providers argument of an onnxruntime session: CUDA with edge-vlm's options, its libraries loaded first."""
    names = list(names)
    load_cuda_libraries(names)
    return [(n, dict(CUDA_PROVIDER_OPTIONS)) if n == "CUDAExecutionProvider" else n for n in names]


def llama_has_gpu() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


GPU_CHECKS = {"onnxruntime": ort_has_cuda, "llama_cpp": llama_has_gpu, "torch": torch_has_cuda}


def resolve(device: str, llm_via: str = "llama_cpp") -> DevicePlan:
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return DevicePlan(["CPUExecutionProvider"], False)
    ort_gpu, llm_gpu = ort_has_cuda(), GPU_CHECKS[llm_via]()
    if device == "cuda":
        missing = [GPU_HINTS[v] for v, ok in (("onnxruntime", ort_gpu), (llm_via, llm_gpu)) if not ok]
        if missing:
            raise DeviceUnavailable("--device cuda is not available here; " + "; ".join(dict.fromkeys(missing)))
        return DevicePlan(["CUDAExecutionProvider", "CPUExecutionProvider"], True)
    plan = DevicePlan(["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_gpu else ["CPUExecutionProvider"],
                      llm_gpu)
    if not ort_gpu:
        plan.notes.append("device auto: vision runs on CPU (onnxruntime has no CUDA provider)")
    if not llm_gpu:
        plan.notes.append(f"device auto: LLM runs on CPU ({GPU_HINTS[llm_via].split(':')[0]})")
    return plan
