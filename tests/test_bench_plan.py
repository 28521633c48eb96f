"""edge-vlm bench and edge-vlm plan: the harness runs and writes well-formed results on tiny
bundles (timings never decide pass/fail), fidelity metrics are right, the planner's parameter
counts equal real models', and its predictions are checked against a measured peak."""
import json
import math

import numpy as np
import pytest

from edge_vlm.bench import fidelity
from edge_vlm.cli import main


# ---- fidelity metrics ------------------------------------------------------------------------
def test_kl_is_zero_for_identical_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 50))
    assert np.allclose(fidelity.kl_per_position(a, a), 0, atol=1e-12)
    b = a + rng.standard_normal((5, 50)) * 0.5
    kl = fidelity.kl_per_position(a, b)
    assert (kl > 0).all()
    # against a direct computation
    p = np.exp(a[0]) / np.exp(a[0]).sum()
    q = np.exp(b[0]) / np.exp(b[0]).sum()
    assert math.isclose(kl[0], float((p * np.log(p / q)).sum()), rel_tol=1e-9)
    # a vocabulary padded on one side is compared on the shared rows
    padded = np.pad(a, ((0, 0), (0, 3)), constant_values=-1e9)  # 3 extra rows nobody predicts
    assert fidelity.kl_per_position(a, padded).max() < 1e-12 and padded.shape[1] == 53


def test_cosine_and_greedy_agreement():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert np.allclose(fidelity.token_cosines(x, 3 * x), 1)
    assert np.allclose(fidelity.token_cosines(x, -x), -1)
    with pytest.raises(ValueError, match="shape"):
        fidelity.token_cosines(x, x[:1])
    assert fidelity.greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, 4)
    assert fidelity.greedy_agreement([1, 2, 3, 4], [1, 9, 3]) == (0.5, 1)


# ---- planner shapes against real models --------------------------------------------------------
def test_llm_param_formulas_equal_real_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_vlm.llms import register_architectures
    from edge_vlm.plan.shapes import llm_shape_from_config

    for tied, kv in ((False, 4), (True, 2)):
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv,
                          intermediate_size=96, vocab_size=300, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        assert llm_shape_from_config(cfg).params == sum(p.numel() for p in model.parameters())
    register_architectures()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("tinygpt_v_phi", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, vocab_size=300)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert llm_shape_from_config(cfg).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["tinygpt-v", "minigpt-v2"])
def test_source_shape_equals_the_loaded_model(tmp_path, family):
    """Q-Former + two projections (TinyGPT-V) and concat-4 at 448 px (MiniGPT-v2), counted without
    loading, equal the parameters of the loaded vision stack and LLM."""
    from edge_vlm.families import load_source
    from edge_vlm.families.synth import write
    from edge_vlm.plan.shapes import from_source

    src_dir = write(family, tmp_path / family, size="mini", seed=0)
    shape = from_source(str(src_dir))
    src = load_source(str(src_dir))
    assert shape.vision.params == sum(p.numel() for p in src.vision.parameters())
    assert shape.vision.image_tokens == src.description["image_tokens"]
    assert shape.llm.params == sum(p.numel() for p in src.llm.parameters())


def test_builtin_declared_shape_equals_the_loaded_model():
    from edge_vlm.families import load_source
    from edge_vlm.plan.shapes import from_source, llm_shape_from_config

    shape = from_source("nano")
    src = load_source("nano")
    assert shape.vision.params == sum(p.numel() for p in src.vision.parameters())
    assert shape.vision.image_tokens == src.description["image_tokens"]
    assert shape.llm == llm_shape_from_config(src.llm.config)


def test_full_size_vision_matches_the_measured_tinygpt_v_bundle():
    """TinyGPT-V's vision.onnx (fp32) measured 4,419,0xx,xxx bytes of weights (README): 1.105 B params."""
    from edge_vlm.plan.shapes import from_family_shape

    s = from_family_shape("tinygpt-v")
    assert abs(s.vision.params * 4 - 4.419e9) / 4.419e9 < 0.003
    assert abs(from_family_shape("minigpt4-7b").llm.params - 6.74e9) / 6.74e9 < 0.01  # LLaMA-7B


# ---- plan CLI -----------------------------------------------------------------------------------
def test_plan_devices_and_a_7b_on_8gb(capsys):
    assert main(["plan", "--devices", "--json"]) == 0
    names = {d["name"] for d in json.loads(capsys.readouterr().out)["devices"]}
    assert {"rtx-3060-ti", "rtx-3070", "rtx-4060", "rtx-3060-12gb", "rtx-4060-ti-16gb", "jetson-orin-nano-8gb",
            "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb"} <= names
    assert main(["plan", "minigpt4-7b", "--device", "rtx-4060", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {c["choice"]["bits"]: c for c in out["configurations"]}
    assert set(rows) == {4, 8, 16} and rows[16]["needed_mb"] > rows[8]["needed_mb"] > rows[4]["needed_mb"]
    assert not rows[16]["fits"]
    kv = next(c for c in rows[4]["components"] if c["name"] == "kv cache")
    assert kv["mb"] == pytest.approx(2 * 32 * 2048 * 4096 * 2 / 2**20)  # llama.cpp f16, the whole context
    assert main(["plan", "minigpt4-7b", "--device", "cpu:64", "--json"]) == 0
    assert all(c["fits"] for c in json.loads(capsys.readouterr().out)["configurations"])


def test_plan_more_images_and_context_need_more(capsys):
    def needed(*extra):
        assert main(["plan", "tinygpt-v", "--device", "jetson-agx-orin-32gb", "--bits", "4", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["configurations"][0]["needed_mb"]

    base = needed()
    assert needed("--images", "4") > base
    assert needed("--context", "4096") > base


@pytest.mark.parametrize("args", [
    ["--device", "rtx-9999"], ["--device", "cpu:lots"], ["--device", "cpu:nan"], ["--device", "cpu:inf"], [],
    ["--device", "cpu:8", "--reserve", "9"], ["--device", "cpu:8", "--context", "0"],
    ["--device", "rtx-4060", "--backend", "gptq"],  # gptq cannot take TinyGPT-V's Phi-2
    ["--device", "rtx-4060", "--backend", "bnb", "--bits", "16"], ["--device", "rtx-4060", "--backend", "foo"]])
def test_plan_bad_input_is_a_clear_error(args, capsys):
    assert main(["plan", "tinygpt-v", *args]) == 2
    err = capsys.readouterr().err
    assert "edge-vlm plan: error:" in err and "Traceback" not in err


def test_plan_a_bundle_uses_its_file_sizes_and_bits(export_backend, capsys):
    from edge_vlm.manifest import load_manifest

    b = export_backend("gguf", 4)
    m = load_manifest(b)
    assert m.llm.shape.layers >= 1 and m.vision.shape.params > 0  # written at export
    assert main(["plan", str(b), "--device", "cpu:2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["configurations"]
    assert row["choice"]["backend"] == "gguf" and row["choice"]["bits"] == 4  # Q4_K_M, not planned as 16-bit
    comp = {c["name"]: c["mb"] for c in row["components"]}
    assert comp["llm weights"] == pytest.approx(m.files[m.llm.file].bytes / 2**20, abs=0.1)
    assert comp["vision weights"] == pytest.approx(m.files[m.vision.file].bytes / 2**20, abs=0.1)


# ---- bench ----------------------------------------------------------------------------------------
def test_bench_runs_and_writes_well_formed_results(export_backend, tiny_source, tmp_path, capsys):
    """Reference + two bundles, interleaved, with fidelity and accuracy on a tiny dataset. Checks
    the shape and consistency of the results, never the timings."""
    from PIL import Image

    data = tmp_path / "vqa"
    (data / "images").mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), color).save(data / "images" / f"{i}.png")
    (data / "questions.json").write_text(json.dumps([["what color is the shape?", "red", 0],
                                                     ["what color is the shape?", "blue", 1]]))
    b16, b4 = export_backend("gguf", 16), export_backend("onnx", 4)
    rc = main(["bench", str(b16), str(b4), "--reference", str(tiny_source), "--dataset", str(data), "--limit", "2",
               "--runs", "2", "--max-new-tokens", "4", "--fidelity-cases", "2", "--fidelity-tokens", "5",
               "--mode", "interleaved", "--name", "t", "--out-dir", str(tmp_path / "out"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    res = json.loads((tmp_path / "out" / "t.json").read_text())
    assert (tmp_path / "out" / "t.png").stat().st_size > 1000
    md = (tmp_path / "out" / "t.md").read_text()
    labels = [t["label"] for t in res["targets"]]
    assert labels[0].startswith("torch fp32") and labels[1:] == [b16.name, b4.name]
    assert all(f"| {x} |" in md for x in labels)
    assert res["mode"] == "interleaved" and res["machine"]["cores"] >= 1 and "numpy" in res["machine"]["packages"]
    assert res["bandwidth"]["gb_s"] > 0
    for t in res["targets"]:
        assert len(t["runs"]) == 2 and len(t["warmup"]) == 1
        for k in ("vision_ms", "ttft_ms", "e2e_ms", "decode_tok_s", "prefill_tok_s"):
            s = t["latency"][k]
            assert s["min"] <= s["median"] <= s["max"]
        assert all(r["generated_tokens"] == 4 for r in t["runs"])  # EOS ignored
        assert t["memory"]["peak_rss_mb"] >= t["load"]["peak_rss_after_load_mb"] >= t["load"]["rss_after_load_mb"] > 50
        assert t["planner"]["predicted_mb"] > 0 and "error_pct" in t["planner"]
        assert t["accuracy"]["n"] == 2 and len(t["accuracy"]["answers"]) == 2
        assert 0 < t["bandwidth_limit"]["fraction"]
    ref, f16, q4 = res["targets"]
    assert ref["speedup"]["e2e_ms"] == 1.0
    # F16 GGUF of an fp32 reference: near-identical distributions; the same image embeddings (fp32 ONNX)
    assert f16["fidelity"]["kl_mean"] < 1e-3 and f16["fidelity"]["vision_cosine_min"] > 0.9999
    assert f16["fidelity"]["greedy_agreement"] == 1.0
    assert q4["fidelity"]["kl_mean"] > f16["fidelity"]["kl_mean"]  # 4-bit loses more than 16-bit
    assert 0 <= q4["fidelity"]["teacher_forced_top1"] <= 1
    assert summary["targets"][1]["fidelity"]["cases"] == 2


def test_bench_reports_a_damaged_bundle_and_a_missing_one(export_backend, tmp_path, capsys):
    import shutil

    assert main(["bench", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 3
    assert "not a bundle folder" in capsys.readouterr().err
    b = tmp_path / "broken"
    shutil.copytree(export_backend("gguf", 4), b)
    gguf = next(b.glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:1000])
    assert main(["bench", str(b), "--runs", "1", "--out-dir", str(tmp_path), "--json"]) == 3
    err = capsys.readouterr().err
    assert "broken" in err and "truncated" in err
    assert main(["bench", "--out-dir", str(tmp_path)]) == 2  # nothing to measure


def test_bandwidth_measure_is_sane():
    from edge_vlm.bench.bandwidth import measure

    r = measure(size_mb=32, runs=3, threads=1)
    assert r["min_gb_s"] <= r["gb_s"] <= r["max_gb_s"] and len(r["runs"]) == 3


def test_bench_bad_image_is_a_clear_error(export_backend, tmp_path, capsys):
    """A missing --image fails before any process starts; a corrupt one fails in the worker with the
    runtime's BadImage message and exit code, not a traceback."""
    b = str(export_backend("gguf", 4))
    assert main(["bench", b, "--image", str(tmp_path / "nope.png"), "--out-dir", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["bench", b, "--image", str(bad), "--runs", "1", "--warmup", "0", "--out-dir", str(tmp_path),
                 "--json"]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err
