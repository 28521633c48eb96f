"""Every LLM backend on the tiny models: export, load, run, agree with the torch reference; the
capability table and `--backend auto` choosing from it."""
import json

import numpy as np
import pytest

from edge_vlm import backends
from edge_vlm.errors import BadInput, MissingPackage
from edge_vlm.manifest import load_manifest, verify_files
from edge_vlm.reference import ReferencePipeline
from edge_vlm.runtime.generate import GenerationStats
from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
from edge_vlm.runtime.sampling import SamplingConfig
from test_bad_input import run_cli

CPU = RuntimeConfig(device="cpu", n_ctx=512)
QUESTION = "what color is the shape?"


def agrees_on_another_prompt(bundle, reference, image):
    """Agreement with the reference on an image and prompt the export did not validate with, held to
    the floor the backend set for itself at export."""
    from edge_vlm.export.llm_validate import reference_trace, teacher_forced_agreement

    with Pipeline.load(bundle, CPU) as p:
        emb = reference.embed(image)
        trace = reference_trace(reference.llm, p.manifest.prompt, QUESTION, emb, 12)
        r = teacher_forced_agreement(trace, p.llm, p.manifest.prompt, QUESTION, emb)
        floor = p.manifest.validation.llm.min_agreement
    assert all(r[k] >= v for k, v in floor.items()), (r, floor)


def greedy(pipe, image, n=10):
    stats = GenerationStats()
    "".join(pipe.generate(image, QUESTION, SamplingConfig(max_tokens=n), stats))
    return stats.tokens


@pytest.fixture(scope="module")
def references(tiny_source, tiny_phi_source):
    return {"llama": ReferencePipeline.load(str(tiny_source), n_ctx=512),
            "phi": ReferencePipeline.load(str(tiny_phi_source), n_ctx=512)}


# ---- the capability table and auto ----------------------------------------------------------

def test_auto_prefers_gguf_for_llama_and_never_picks_it_for_the_phi_variant():
    b, why = backends.choose("auto", "llama", 4)
    assert b.name == "gguf" and "gguf" in why
    b, why = backends.choose("auto", "tinygpt_v_phi", 4)
    assert b.name == "onnx" and "gguf: architecture 'tinygpt_v_phi' not supported" in why


def test_auto_skips_a_backend_whose_extra_is_missing(monkeypatch):
    real = backends.missing_modules
    monkeypatch.setattr(backends, "missing_modules", lambda mods: [m for m in real(mods)] + (
        ["llama_cpp"] if "llama_cpp" in mods else []))
    b, why = backends.choose("auto", "llama", 8)
    assert b.name == "onnx" and "gguf: not installed (missing llama_cpp)" in why and "pip install" in why


def test_no_backend_fits_lists_every_reason(monkeypatch):
    monkeypatch.setattr(backends, "missing_modules", lambda mods: list(mods))
    with pytest.raises(BadInput) as e:
        backends.choose("auto", "tinygpt_v_phi", 4)
    msg = str(e.value)
    assert "gguf: architecture 'tinygpt_v_phi' not supported" in msg
    for name in ("onnx", "gptq", "bnb"):
        assert f"  {name}: " in msg
    assert "bnb: not installed" in msg and "'edge-vlm[export,bnb]'" in msg


def test_requested_backend_that_cannot_do_the_bits():
    with pytest.raises(BadInput, match="gptq cannot export.*no 16-bit mode"):
        backends.choose("gptq", "llama", 16)


def test_backends_command_prints_the_table(capsys):
    code, out, _ = run_cli(["backends", "--json"], capsys)
    rows = {r["backend"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"gguf", "onnx", "gptq", "bnb"}
    assert rows["onnx"]["architectures"] == "any torch decoder" and rows["gguf"]["architectures"] == ["llama"]
    assert rows["gguf"]["runtime_needs_torch"] is False and rows["bnb"]["runtime_needs_torch"] is True
    code, out, _ = run_cli(["backends"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("backend") and len(out.splitlines()) == 5
    assert all(r["can_run"] and r["can_export"] for r in rows.values())  # everything is installed here
    code, out, _ = run_cli(["backends", "--device", "cuda", "--json"], capsys)
    rows = {r["backend"]: r for r in json.loads(out)}
    # exporting for a GPU target needs no GPU here; running on one does
    assert all(r["can_export"] for r in rows.values())
    from edge_vlm.runtime import device
    if not device.torch_has_cuda():
        assert not rows["bnb"]["can_run"] and "torch sees no CUDA GPU" in rows["bnb"]["why_not"]


def test_options_a_backend_would_ignore_are_refused(tiny_source, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_source), "--backend", "bnb", "--group-size", "64", "-o",
                            tmp_path / "a"], capsys)
    assert code == 2 and "--group-size does not apply to the bnb backend (it is for onnx, gptq" in err
    code, _, err = run_cli(["export", str(tiny_source), "--calibration", "text", "-o", tmp_path / "b"], capsys)
    assert code == 2 and "--calibration does not apply to the gguf backend" in err  # auto chose gguf
    code, _, err = run_cli(["export", str(tiny_source), "--backend", "gptq", "--group-size", "48", "-o",
                            tmp_path / "c"], capsys)
    assert code == 2 and "power of two" in err and not any(tmp_path.iterdir())


def test_quant_flag_is_gguf_only(tiny_source, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_source), "--backend", "onnx", "--quant", "Q4_0", "-o",
                            tmp_path / "b"], capsys)
    assert code == 2 and "--quant names a llama.cpp type" in err and not (tmp_path / "b").exists()


# ---- onnx -----------------------------------------------------------------------------------

@pytest.mark.parametrize("llm", ["llama", "phi"])
def test_onnx_fp32_decoder_matches_torch_and_fp16_bundle_gives_the_same_greedy_tokens(
        export_backend, references, shape_image, llm):
    b = export_backend("onnx", 16, llm)
    m = load_manifest(b)
    exact = m.validation.llm_fp32
    assert exact.top1_agreement == 1.0 and exact.logits_max_abs_diff < 1e-4, exact
    assert m.llm.backend == "onnx" and sum(v for k, v in m.llm.quant.tensor_types.items()
                                           if k.startswith("float16")) > 0.99
    want = greedy(references[llm], shape_image)
    with Pipeline.load(b, CPU) as p:
        assert greedy(p, shape_image) == want


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_quantized_bundle_runs_and_records_its_quantization(export_backend, references, shape_image, bits):
    b = export_backend("onnx", bits)
    m = load_manifest(b)
    q = m.llm.quant
    assert q.bits == bits and q.group_size == 32
    assert q.method == {4: "MatMulNBits int4 (hqq)", 8: "MatMulNBits int8 (rtn)"}[bits]
    # every matmul, the tied output head included (at 8 bits under a 4-bit body, as llama.cpp keeps it
    # wider); the token-embedding table beside the graph is fp16
    types = q.tensor_types
    assert q.lm_head_bits == 8 and m.llm.onnx_graph.kind == "fused"
    # (4 bits: HQQ's zero points split into integer ones + corrections, int4 columns folded into each projection)
    assert types[f"int{bits} (block 32)"] > 0 and types["int8 (block 32)"] + types.get("int4 (block 32)", 0) + types[
        "float16 (embed_tokens.npy)"] + types.get("int4 (HQQ zero-point corrections)", 0) > 0.99
    assert bits < q.bits_per_weight < 16
    assert set(m.files) == {"vision.onnx", "llm.onnx", "llm.onnx.data", "embed_tokens.npy", "tokenizer.json"}
    with Pipeline.load(b, CPU) as p:
        r = p.answer(shape_image, QUESTION, SamplingConfig(max_tokens=6))
    assert r.stats.generated_tokens >= 1 and r.timings_ms["vision_ms"] > 0
    agrees_on_another_prompt(b, references["llama"], shape_image)


def test_onnx_block_size_and_int4_method_are_configurable(export_backend, shape_image):
    b = export_backend("onnx", 4, group_size=16, int4_method="rtn", accuracy_level=4)
    q = load_manifest(b).llm.quant
    assert q.group_size == 16 and "int4 (block 16)" in q.tensor_types and q.method.endswith("(rtn)")
    assert q.accuracy_level == 4 and q.symmetric is False
    with Pipeline.load(b, CPU) as p:
        assert p.answer(shape_image, QUESTION, SamplingConfig(max_tokens=3)).stats.generated_tokens >= 1


def test_onnx_traced_path_for_other_decoders_with_external_data(tiny_source, tmp_path, monkeypatch, shape_image):
    """A decoder the fused builder has no reader for is traced by torch.onnx, checked in fp32 and quantized by
    onnxruntime (the graph every onnx bundle had before the fused one, which the runtime still runs); decoders
    over 2 GB keep their weights in a .data file: both at tiny scale."""
    from edge_vlm.export import decoder_archs, llm_onnx
    from edge_vlm.export.run import ExportConfig, run

    monkeypatch.setattr(decoder_archs, "ARCHS", {})
    monkeypatch.setattr(llm_onnx, "EXTERNAL_DATA_BYTES", 10_000)
    b = run(ExportConfig(source=str(tiny_source), out=str(tmp_path / "b"), backend="onnx", bits=8), progress=False)
    m = load_manifest(b)
    assert m.llm.onnx_graph.kind == "traced"
    assert {"llm.onnx", "llm.onnx.data"} <= set(m.files) and m.files["llm.onnx.data"].bytes > 100_000
    assert m.validation.llm_fp32.top1_agreement == 1.0
    with Pipeline.load(b, CPU) as p:
        assert not p.llm.fused
        assert p.answer(shape_image, QUESTION, SamplingConfig(max_tokens=4)).stats.generated_tokens >= 1


def test_fused_bundle_records_its_graph_and_the_planner_counts_its_data_file(export_backend):
    from edge_vlm.plan.shapes import from_bundle

    b = export_backend("onnx", 4)
    m = load_manifest(b)
    assert m.llm.onnx_graph.kind == "fused" and m.llm.onnx_graph.dtype == "float32"
    assert m.validation.llm_fp32.top1_agreement == 1.0 and m.validation.llm_fp32.logits_max_abs_diff < 1e-3
    shape = from_bundle(b)
    assert shape.bundle["llm_weight_bytes"] == m.files["llm.onnx"].bytes + m.files["llm.onnx.data"].bytes
    assert shape.bundle["onnx_dtype"] == "float32"


def test_onnx_runtime_does_not_import_torch(export_backend, shape_image):
    import subprocess
    import sys

    code = (f"import sys, edge_vlm\nfrom edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig\n"
            f"p = Pipeline.load({str(export_backend('onnx', 4))!r}, RuntimeConfig(device='cpu', n_ctx=256))\n"
            f"print(p.answer({str(shape_image)!r}, 'what?').stats.generated_tokens)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'runtime imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_onnx_context_overflow_is_a_clear_error(export_backend, shape_image):
    from edge_vlm.errors import ContextOverflow

    with Pipeline.load(export_backend("onnx", 4), RuntimeConfig(device="cpu", n_ctx=16)) as p:
        with pytest.raises(ContextOverflow):
            p.answer(shape_image, "describe " * 20, SamplingConfig(max_tokens=4))


def test_damaged_onnx_llm_is_refused(export_backend, tmp_path, shape_image, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(export_backend("onnx", 4), b)
    data = bytearray((b / "llm.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "llm.onnx").write_bytes(bytes(data))
    code, _, err = run_cli(["run", str(b), "--image", str(shape_image), "--prompt", "hi"], capsys)
    assert code == 3 and "llm.onnx: sha256 mismatch" in err


@pytest.mark.parametrize("edit,message", [
    (lambda t: {**t, "file": "../tokenizer.json"}, "relative path inside the bundle"),
    (lambda t: {k: v for k, v in t.items() if k != "embed_tokens"}, "lacks 'file' or 'embed_tokens'"),
])
def test_onnx_manifest_tokenizer_entries_are_checked(export_backend, tmp_path, shape_image, capsys, edit, message):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(export_backend("onnx", 4), b)
    m = json.loads((b / "manifest.json").read_text())
    m["llm"]["tokenizer"] = edit(m["llm"]["tokenizer"])
    (b / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", str(b), "--image", str(shape_image), "--prompt", "hi"], capsys)
    assert code == 3 and message in err


# ---- bnb ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,llm", [(4, "llama"), (8, "llama"), (4, "phi")])
def test_bnb_bundle_runs_and_agrees_with_reference(export_backend, references, shape_image, bits, llm):
    b = export_backend("bnb", bits, llm)
    m = load_manifest(b)
    assert m.llm.backend == "bnb" and m.llm.file == "llm" and m.llm.quant.bits == bits
    assert any(f.startswith("llm/") and f.endswith(".safetensors") for f in m.files)
    verify_files(b, m, hashes="sha256")  # files inside the checkpoint folder are listed and hashed
    agrees_on_another_prompt(b, references[llm], shape_image)


def test_unlisted_file_in_a_checkpoint_folder_is_refused(export_backend, tmp_path, capsys):
    """transformers would load any *.safetensors in llm/: one the manifest does not list is an error."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(export_backend("bnb", 8), b)
    (b / "llm" / "model-00002-of-00002.safetensors").write_bytes(b"x")
    code, _, err = run_cli(["inspect", str(b)], capsys)
    assert code == 3 and "holds files the manifest does not list: llm/model-00002-of-00002.safetensors" in err


def test_bundle_whose_extra_is_missing_says_how_to_install(export_backend, monkeypatch):
    b = export_backend("bnb", 8)
    real = backends.missing_modules
    monkeypatch.setattr(backends, "missing_modules", lambda mods: [m for m in mods if m == "bitsandbytes"] + real(mods))
    with pytest.raises(MissingPackage, match=r"bnb backend.*pip install torch==2.13.0 'edge-vlm\[bnb\]'"):
        Pipeline.load(b, CPU)


def test_phi_variant_through_auto_gets_onnx(tiny_phi_source, tmp_path, capsys):
    code, out, err = run_cli(["export", str(tiny_phi_source), "--bits", "8", "-o", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "backend auto -> onnx" in err and load_manifest(tmp_path / "b").llm.backend == "onnx"


def test_outputs_differ_between_backends_only_by_quantization(export_backend, references, shape_image):
    """Same shared decode loop: at 8 bits onnx and bnb both stay close to the reference's logits."""
    from edge_vlm.export.llm_validate import reference_trace, teacher_forced_agreement

    ref = references["llama"]
    for backend in ("onnx", "bnb"):
        with Pipeline.load(export_backend(backend, 8), CPU) as p:
            emb = ref.embed(shape_image)
            trace = reference_trace(ref.llm, p.manifest.prompt, QUESTION, emb, 12)
            r = teacher_forced_agreement(trace, p.llm, p.manifest.prompt, QUESTION, emb)
        assert r["top5_agreement"] == 1.0 and np.isfinite(r["logits_max_abs_diff"]), (backend, r)


# ---- gptq -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,calibration", [(4, "image"), (8, "text")])
def test_gptq_bundle_runs_and_records_its_calibration(export_backend, references, shape_image, bits, calibration):
    b = export_backend("gptq", bits, calibration=calibration)
    m = load_manifest(b)
    q = m.llm.quant
    assert m.llm.backend == "gptq" and q.bits == bits and q.calibration == calibration
    assert q.group_size == 64  # the largest of 128/64/32 dividing hidden 64 and intermediate 128
    cs = q.calibration_set
    assert cs["folder"] == "easy-vqa-sample" and cs["sequences"] == 40
    assert cs["with_image"] == (40 if calibration == "image" else 0)
    assert not any(f.endswith("quant_log.csv") for f in m.files)
    agrees_on_another_prompt(b, references["llama"], shape_image)


def test_image_conditioned_calibration_changes_the_quantized_weights(export_backend):
    """The splice hook is not decorative: image-calibrated GPTQ weights differ from text-calibrated ones."""
    from safetensors.numpy import load_file

    a = load_file(str(export_backend("gptq", 4, calibration="image") / "llm" / "model.safetensors"))
    b = load_file(str(export_backend("gptq", 4, calibration="text") / "llm" / "model.safetensors"))
    qweights = [k for k in a if k.endswith(".qweight")]
    assert qweights and sum(not np.array_equal(a[k], b[k]) for k in qweights) >= len(qweights) // 2


def test_calibration_sequences_put_the_image_where_the_template_says(tiny_source):
    from types import SimpleNamespace

    from edge_vlm.export.llm_gptq import DEFAULT_CALIBRATION, calibration_sequences, splice_hook
    from edge_vlm.families import load_source
    from edge_vlm.reference import TorchLLMSession

    src = load_source(str(tiny_source))
    ref = TorchLLMSession(src.llm, src.tokenizer)
    n_img = src.description["image_tokens"]
    ctx = SimpleNamespace(src=src, ref_llm=ref,
                          embed_image=lambda path: np.full((n_img, 64), 0.5, np.float32))
    seqs = calibration_sequences(ctx, "image", DEFAULT_CALIBRATION)
    s = seqs[0]
    before, _ = src.prompt.render("x")
    assert s.image_at == len(ref.tokenize(before, False))
    placeholder = s.ids[s.image_at]
    assert s.ids[s.image_at:s.image_at + n_img] == [placeholder] * n_img
    assert placeholder not in s.ids[:s.image_at] + s.ids[s.image_at + n_img:]
    # one placeholder per image: the same question and answer about two images stay two sequences
    assert len({t.ids[t.image_at] for t in seqs}) == 5 and len({tuple(t.ids) for t in seqs}) == len(seqs)
    assert ref.detokenize(s.ids[s.image_at + n_img:]).endswith("<|im_end|>")
    import torch

    hook = splice_hook(seqs)
    emb = src.llm.get_input_embeddings()
    out = hook(emb, (torch.tensor([s.ids]),), emb(torch.tensor([s.ids])))
    assert hook.spliced == {tuple(s.ids)} and torch.all(out[0, s.image_at:s.image_at + n_img] == 0.5)
    text = calibration_sequences(ctx, "text", DEFAULT_CALIBRATION)
    assert all(t.image is None and placeholder not in t.ids for t in text)


def test_gptq_refuses_16_bits_and_a_missing_calibration_set(tiny_source, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tiny_source), "--backend", "gptq", "--bits", "16", "-o", tmp_path / "a"],
                           capsys)
    assert code == 2 and "no 16-bit mode" in err
    code, _, err = run_cli(["export", str(tiny_source), "--backend", "gptq", "--calibration-data", tmp_path,
                            "-o", tmp_path / "b"], capsys)
    assert code == 2 and "no calibration set" in err and not (tmp_path / "b").exists()


def test_hqq_zero_point_split_is_exact_and_on_the_fast_path():
    """HQQ's float zero points become packed uint8 ones plus a correction matmul: the same outputs (at
    accuracy_level 0, where both compute in fp32), and no float zero point is left to slow the kernel."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    from edge_vlm.export.llm_onnx import _matmul_nbits_quantizer, split_float_zero_points

    rng = np.random.default_rng(0)
    k, n = 96, 160  # 3 blocks of 32: an odd number of zero points per row (packing pads the byte)
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "s", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "s", n])],
                          [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    qz = _matmul_nbits_quantizer()(model, bits=4, block_size=32, op_types_to_quantize=("MatMul",),
                                   algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4,
                                                                        op_types_to_quantize=("MatMul",)))
    qz.process()
    hqq = qz.model.model
    fast = onnx.ModelProto()
    fast.CopyFrom(hqq)
    assert split_float_zero_points(fast) == 1
    zp = {t.name: t for t in fast.graph.initializer}[next(x for x in fast.graph.node if x.op_type == "MatMulNBits").input[3]]
    assert zp.data_type == TensorProto.UINT8 and list(zp.dims) == [n * 2]
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
           for m in (hqq, fast)]
    assert np.abs(run[0] - run[1]).max() < 1e-4 * max(1.0, np.abs(run[0]).max())


# ---- gguf: --bits 4 chooses its type by measurement ----------------------------------------------

def test_bits_4_probes_the_4bit_types_and_keeps_the_closest(export_backend):
    from edge_vlm.export.llm_gguf import PROBE_CANDIDATES

    m = load_manifest(export_backend("gguf", 4))
    probe = m.llm.quant.model_extra["probe"]
    assert set(probe["scores"]) == set(PROBE_CANDIDATES[4]) and all(v >= 0 for v in probe["scores"].values())
    assert probe["chosen"] == min(probe["scores"], key=probe["scores"].get) == m.llm.quant.requested
    assert m.llm.file == f"llm-{probe['chosen'].lower()}.gguf"
    assert sorted(p.name for p in export_backend("gguf", 4).glob("*.gguf")) == [m.llm.file]  # the others deleted
    assert any("closest to the reference" in n for n in m.validation.notes)


def test_quant_flag_skips_the_probe(export_tiny):
    m = load_manifest(export_tiny("Q4_K_M"))
    assert m.llm.quant.requested == "Q4_K_M" and "probe" not in (m.llm.quant.model_extra or {})


def test_onnxruntime_sessions_get_cuda_with_a_tight_arena_and_cpu_as_is():
    from edge_vlm.runtime.device import CUDA_PROVIDER_OPTIONS, ort_providers

    assert ort_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    got = ort_providers(("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert got == [("CUDAExecutionProvider", CUDA_PROVIDER_OPTIONS), "CPUExecutionProvider"]
    assert got[0][1] is not CUDA_PROVIDER_OPTIONS  # onnxruntime may not change the module's defaults
