"""CUDA paths: llama.cpp GPU offload and onnxruntime's CUDA provider. Skipped without both builds."""
import pytest

from edge_vlm.runtime import device

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (device.ort_has_cuda() and device.llama_has_gpu()),
                                 reason="needs onnxruntime-gpu and a CUDA build of llama-cpp-python")]


def test_cuda_bundle_matches_cpu_bundle(export_tiny, shape_image):
    from edge_vlm.runtime.generate import GenerationStats
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
    from edge_vlm.runtime.sampling import SamplingConfig

    toks = {}
    for dev in ("cpu", "cuda"):
        with Pipeline.load(export_tiny("F16"), RuntimeConfig(device=dev)) as p:
            if dev == "cuda":
                assert "CUDAExecutionProvider" in p.vision.providers and p.device.llm_gpu_layers != 0
            stats = GenerationStats()
            "".join(p.generate(shape_image, "what color is the shape?", SamplingConfig(max_tokens=8), stats))
            toks[dev] = stats.tokens
    # fp16 GPU kernels may flip a near-tie late in the sequence; the first tokens must agree
    assert toks["cuda"][:3] == toks["cpu"][:3]


def test_auto_uses_the_gpu():
    plan = device.resolve("auto")
    assert plan.llm_gpu_layers != 0 and "CUDAExecutionProvider" in plan.vision_providers and not plan.notes
