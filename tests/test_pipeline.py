"""End to end on the tiny model: export -> bundle -> runtime, against the torch reference."""
import numpy as np
import pytest

from edge_vlm.export.llm_validate import reference_trace, teacher_forced_agreement
from edge_vlm.manifest import load_manifest
from edge_vlm.reference import ReferencePipeline
from edge_vlm.runtime.generate import GenerationStats
from edge_vlm.runtime.llm_gguf import LlamaCppConfig, LlamaCppSession
from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
from edge_vlm.runtime.sampling import SamplingConfig

EXACT = RuntimeConfig(device="cpu", exact=True, n_ctx=512)
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def reference(tiny_source):
    return ReferencePipeline.load(str(tiny_source), n_ctx=512)


def greedy_tokens(pipe, image, n=12):
    stats = GenerationStats()
    # ignore_eos through a long max_tokens is not needed: compare what each side really emits
    "".join(pipe.generate(image, QUESTION, SamplingConfig(max_tokens=n), stats))
    return stats.tokens


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_bundle_greedy_tokens_equal_torch_reference(export_tiny, reference, shape_image, quant):
    """The splice is right: same image, same prompt -> the same greedy tokens as torch."""
    want = greedy_tokens(reference, shape_image)
    assert len(want) >= 3, "reference produced too few tokens for a meaningful comparison"
    with Pipeline.load(export_tiny(quant), EXACT) as p:
        got = greedy_tokens(p, shape_image)
    assert got == want


def test_image_embeddings_change_the_answer(export_tiny, shape_image, tmp_path):
    """Guard against a splice that ignores the image: a different image -> different logits."""
    from PIL import Image

    other = tmp_path / "red.png"
    Image.fromarray(np.full((64, 64, 3), (220, 20, 20), np.uint8)).save(other)
    with Pipeline.load(export_tiny("F32"), EXACT) as p:
        outs = []
        for img in (shape_image, other):
            from edge_vlm.runtime.generate import prefill

            prefill(p.llm, p.manifest.prompt, QUESTION, p.vision.embed(img), 4, GenerationStats())
            outs.append(p.llm.logits())
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-3


def test_q8_0_agrees_with_reference(export_tiny, reference, shape_image):
    b = export_tiny("Q8_0")
    m = load_manifest(b)
    assert m.llm.quant.requested == "Q8_0" and "Q8_0" in m.llm.quant.tensor_types
    s = LlamaCppSession(b / m.llm.file, LlamaCppConfig(n_ctx=512, exact=True))
    try:
        emb = reference.embed(shape_image)
        r = teacher_forced_agreement(reference_trace(reference.llm, m.prompt, QUESTION, emb, 24), s, m.prompt,
                                     QUESTION, emb)
    finally:
        s.close()
    assert r["top1_agreement"] >= 0.9, r


def test_q4_bundle_runs_and_records_real_tensor_mix(export_tiny, shape_image):
    m = load_manifest(export_tiny("Q4_K_M"))
    q = m.llm.quant
    # a 64-wide model cannot hold k-quants (rows must be multiples of 256): the manifest must say so
    assert q.requested == "Q4_K_M" and "Q4_K" not in q.tensor_types
    assert abs(sum(q.tensor_types.values()) - 1) < 1e-3 and q.bits_per_weight > 4
    with Pipeline.load(export_tiny("Q4_K_M"), RuntimeConfig(device="cpu")) as p:
        r = p.answer(shape_image, QUESTION, SamplingConfig(max_tokens=5))
    assert r.stats.generated_tokens >= 1 and r.timings_ms["vision_ms"] > 0


def test_manifest_is_self_describing(export_tiny):
    b = export_tiny("F16")
    m = load_manifest(b)
    assert m.format_version == 1 and m.family == "nano"
    assert m.preprocess.image_size == 64 and m.preprocess.resize == "bicubic"
    assert m.vision.n_image_tokens == 2 and m.vision.n_embd == m.llm.n_embd == 64
    assert "<ImageHere>" in m.prompt.template and m.prompt.stop == ["<|im_end|>"]
    assert set(m.files) == {"vision.onnx", "llm-f16.gguf"}
    assert all(len(f.sha256) == 64 and f.bytes > 0 for f in m.files.values())
    v = m.validation.vision
    assert v.traced_batch not in (1, 3) and set(v.max_abs_diff) >= {"batch1", "batch3"}


def test_sampling_is_seeded_and_streams(export_tiny, shape_image):
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=8, seed=7)
    with Pipeline.load(export_tiny("F16"), RuntimeConfig(device="cpu")) as p:
        a = list(p.generate(shape_image, QUESTION, cfg))
        b = list(p.generate(shape_image, QUESTION, cfg))
    assert a == b and len(a) >= 1


def test_a_llama_cpp_built_with_every_cpu_variant_loads_the_best_for_this_cpu():
    """`make setup` builds llama.cpp's CPU backend once per instruction-set level; edge-vlm loads them
    (llama-cpp-python does not), and ggml picks the best this CPU runs."""
    import ctypes
    from pathlib import Path

    from edge_vlm.runtime.llm_gguf import CPU_VARIANT_GLOB, _llama, _loaded_ggml

    L = _llama()
    package = Path(L.__file__).parent
    if not any(d.glob(CPU_VARIANT_GLOB) for d in (package / "lib", package.parent / "bin")):
        pytest.skip("this llama-cpp-python has its CPU backend linked in (not a GGML_CPU_ALL_VARIANTS build)")
    ggml = ctypes.CDLL(_loaded_ggml(package))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    assert ggml.ggml_backend_dev_count() >= 1
    assert "AVX2 = 1" in L.llama_print_system_info().decode() or not any("avx2" in line for line in open(
        "/proc/cpuinfo") if line.startswith("flags"))


def test_several_sequences_in_one_llama_context_equal_each_alone(export_backend):
    """The server's batched path: prompts of three sequences evaluated in one batch, then their decode
    steps together, give each sequence the greedy tokens it gets alone (F32 KV cache: bit-exact)."""
    import numpy as np

    from edge_vlm.manifest import load_manifest
    from edge_vlm.runtime.llm_gguf import LlamaCppConfig, LlamaCppSession

    b = export_backend("gguf", 8)
    f = b / load_manifest(b).llm.file
    alone = LlamaCppSession(f, LlamaCppConfig(n_ctx=256, n_threads=1, exact=True))
    batched = LlamaCppSession(f, LlamaCppConfig(n_ctx=256, n_threads=1, exact=True, n_seq=3))
    try:
        prompts = [alone.tokenize(p, False) for p in ("hello there", "what is the colour of", "a b c d")]
        want = []
        for ids in prompts:
            alone.reset()
            alone.eval_tokens(ids)
            toks = []
            for _ in range(6):
                toks.append(int(np.argmax(alone.logits())))
                alone.eval_tokens([toks[-1]])
            want.append(toks)
        first = batched.seq_tokens([(s, k, t, k == len(ids) - 1) for s, ids in enumerate(prompts)
                                    for k, t in enumerate(ids)])
        got, pos = [[int(np.argmax(lg))] for lg in first], [len(ids) for ids in prompts]
        for _ in range(5):
            step = batched.seq_tokens([(s, pos[s], got[s][-1], True) for s in range(3)])
            for s in range(3):
                pos[s] += 1
                got[s].append(int(np.argmax(step[s])))
        assert got == want
    finally:
        alone.close()
        batched.close()
