"""CUDA paths: llama.cpp GPU offload, onnxruntime's CUDA provider (vision and the ONNX decoder),
and torch on CUDA for the gptq/bnb backends. Each test skips unless its own GPU build is present."""
import pytest

from edge_vlm.runtime import device

pytestmark = pytest.mark.gpu
needs_ort = pytest.mark.skipif(not device.ort_has_cuda(), reason="needs onnxruntime-gpu and a CUDA GPU")
needs_llama = pytest.mark.skipif(not (device.ort_has_cuda() and device.llama_has_gpu()),
                                 reason="needs onnxruntime-gpu and a CUDA build of llama-cpp-python")
needs_torch = pytest.mark.skipif(not (device.ort_has_cuda() and device.torch_has_cuda()),
                                 reason="needs onnxruntime-gpu and a CUDA build of torch")
QUESTION = "what color is the shape?"


# onnxruntime's CPU MatMulNBits at accuracy_level 4 multiplies int8-quantized activations, its CUDA kernel fp16 ones:
# the two providers' logits for one 4/8-bit graph differ by about 1e-2 of their scale (measured on an H200), enough
# to flip a near-tie in a random-weight model's flat logits. Quantized graphs are compared by their first logits.
QUANT_LOGITS_COSINE = 0.995
QUANT_TOP_K = 5


def run_on(bundle, dev, image, check=None):
    """(greedy tokens, the first answer position's logits) of the bundle on a device."""
    import numpy as np

    from edge_vlm.runtime.generate import GenerationStats, prefill
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
    from edge_vlm.runtime.sampling import SamplingConfig

    with Pipeline.load(bundle, RuntimeConfig(device=dev, n_ctx=512)) as p:
        if dev == "cuda":
            assert "CUDAExecutionProvider" in p.vision.providers and p.device.llm_on_gpu
        if check:
            check(p)
        prefill(p.llm, p.manifest.prompt, QUESTION, p.vision.embed(image), 8, GenerationStats())
        first = np.array(p.llm.logits(), np.float64)
        stats = GenerationStats()
        "".join(p.generate(image, QUESTION, SamplingConfig(max_tokens=8), stats))
    return stats.tokens, first


def tokens_on(bundle, dev, image, check=None):
    return run_on(bundle, dev, image, check)[0]


def assert_same_answer(cpu, cuda, quantized: bool):
    import numpy as np

    (cpu_tokens, a), (cuda_tokens, b) = cpu, cuda
    if not quantized:  # fp16 GPU kernels may flip a near-tie late in the sequence; the first tokens must agree
        assert cuda_tokens[:3] == cpu_tokens[:3]
        return
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos >= QUANT_LOGITS_COSINE, f"first-token logits cosine {cos:.4f} between CPU and CUDA"
    assert cpu_tokens[0] in np.argsort(b)[-QUANT_TOP_K:] and cuda_tokens[0] in np.argsort(a)[-QUANT_TOP_K:]


@needs_llama
def test_cuda_gguf_bundle_matches_cpu_bundle(export_tiny, shape_image):
    cpu, cuda = (tokens_on(export_tiny("F16"), d, shape_image) for d in ("cpu", "cuda"))
    # fp16 GPU kernels may flip a near-tie late in the sequence; the first tokens must agree
    assert cuda[:3] == cpu[:3]


@needs_ort
@pytest.mark.parametrize("bits", [16, 4])
def test_cuda_onnx_decoder_keeps_its_cache_on_the_gpu(export_backend, shape_image, bits):
    b = export_backend("onnx", bits, device="cuda")

    def on_gpu(p):
        assert p.llm.device == "cuda" and all(v.device_name().lower() == "cuda" for v in p.llm.past)

    assert_same_answer(run_on(b, "cpu", shape_image), run_on(b, "cuda", shape_image, on_gpu), quantized=bits < 16)


@needs_ort
def test_a_cpu_bundle_on_cuda_says_to_export_for_cuda(export_backend):
    from edge_vlm.errors import DeviceUnavailable
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    with pytest.raises(DeviceUnavailable, match="export with --device cuda"):
        # device="cpu": on a GPU machine the default (auto) would make a CUDA bundle
        Pipeline.load(export_backend("onnx", 4, device="cpu"), RuntimeConfig(device="cuda", n_ctx=512))


@needs_ort
@pytest.mark.parametrize("llm", ["llama", "phi"])
def test_cuda_export_gives_an_fp16_graph_whose_cache_stays_on_the_gpu_in_fp16(export_backend, shape_image, llm):
    import numpy as np

    from edge_vlm.manifest import load_manifest

    b = export_backend("onnx", 4, llm, device="cuda")
    assert load_manifest(b).llm.onnx_graph.dtype == "float16"

    def fp16_on_gpu(p):
        assert p.llm.dtype == np.float16 and p.llm.capacity == 512  # allocated at n_ctx on CUDA, never regrown
        assert all(v.device_name().lower() == "cuda" and v.data_type() == "tensor(float16)" for v in p.llm.past)

    assert_same_answer(run_on(b, "cpu", shape_image), run_on(b, "cuda", shape_image, fp16_on_gpu), quantized=True)


@needs_torch
@pytest.mark.parametrize("backend", ["bnb", "gptq"])
def test_cuda_torch_backends_run(export_backend, shape_image, backend):
    pytest.importorskip({"bnb": "bitsandbytes", "gptq": "gptqmodel"}[backend])
    assert len(tokens_on(export_backend(backend, 8), "cuda", shape_image)) >= 1


@needs_llama
def test_auto_uses_the_gpu():
    plan = device.resolve("auto")
    assert plan.llm_gpu_layers != 0 and "CUDAExecutionProvider" in plan.vision_providers and not plan.notes


@needs_ort
def test_cuda_bundle_vision_is_an_fp16_graph_computed_on_the_gpu(tmp_path, tiny_source, shape_image):
    """--device cuda: the vision model defaults to auto = a true fp16 graph, run by the CUDA provider, whose
    embeddings hold the fp16 floor against the fp32 vision model of a CPU bundle."""
    import numpy as np
    import onnx

    from edge_vlm.export import vision_precision as vp
    from edge_vlm.export.run import ExportConfig, run
    from edge_vlm.manifest import load_manifest
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    # the LLM backend is beside the point: onnx, so that the test needs no more than its skip condition says
    b = run(ExportConfig(source=str(tiny_source), out=str(tmp_path / "cuda"), backend="onnx", bits=8, device="cuda"),
            progress=False)
    ref = run(ExportConfig(source=str(tiny_source), out=str(tmp_path / "cpu"), backend="onnx", bits=8, device="cpu"),
              progress=False)
    m = load_manifest(b)
    assert m.vision.precision == "fp16" and m.vision.built_for == "cuda"
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(b / "vision.onnx")).graph.initializer)
    with Pipeline.load(b, RuntimeConfig(device="cuda")) as p:
        assert "CUDAExecutionProvider" in p.vision.providers
        got = p.vision.embed(shape_image).astype(np.float64)
    with Pipeline.load(ref, RuntimeConfig(device="cpu")) as p:
        want = p.vision.embed(shape_image).astype(np.float64)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.mean() >= vp.FLOORS["fp16"][0] and cos.min() >= vp.FLOORS["fp16"][1]
