"""Where each component runs: `--device auto|cpu|cuda` resolved against what is installed."""
from __future__ import annotations

from dataclasses import dataclass, field

from edge_vlm.errors import DeviceUnavailable

ORT_GPU_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
                "(on Jetson: the onnxruntime-gpu wheel for your JetPack, see README)")
LLAMA_GPU_HINT = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                  "llama-cpp-python==0.3.36")


@dataclass
class DevicePlan:
    vision_providers: list[str]
    llm_gpu_layers: int
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (f"vision on {'CUDA' if 'CUDAExecutionProvider' in self.vision_providers else 'CPU'}, "
                f"LLM on {'CUDA' if self.llm_gpu_layers else 'CPU'}")


def ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # loading the vision model then says what to install
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def llama_has_gpu() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve(device: str) -> DevicePlan:
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {device!r}: use auto, cpu or cuda")
    cpu = DevicePlan(["CPUExecutionProvider"], 0)
    if device == "cpu":
        return cpu
    ort_gpu, llama_gpu = ort_has_cuda(), llama_has_gpu()
    if device == "cuda":
        missing = []
        if not ort_gpu:
            missing.append(f"onnxruntime has no CUDA provider: {ORT_GPU_HINT}")
        if not llama_gpu:
            missing.append(f"llama-cpp-python was built without GPU offload: {LLAMA_GPU_HINT}")
        if missing:
            raise DeviceUnavailable("--device cuda is not available here; " + "; ".join(missing))
        return DevicePlan(["CUDAExecutionProvider", "CPUExecutionProvider"], -1)
    plan = DevicePlan(["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_gpu else ["CPUExecutionProvider"],
                      -1 if llama_gpu else 0)
    if not ort_gpu:
        plan.notes.append("device auto: vision runs on CPU (onnxruntime has no CUDA provider)")
    if not llama_gpu:
        plan.notes.append("device auto: LLM runs on CPU (llama-cpp-python has no GPU offload)")
    return plan
