"""Bad input gets a clear error, a non-zero exit, and nothing half-written."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edge_vlm.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def bundle_copy(export_tiny, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(export_tiny("Q8_0"), dst)
    return dst


def test_truncated_image(bundle_copy, shape_image, tmp_path, capsys):
    bad = tmp_path / "half.png"
    data = shape_image.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["run", bundle_copy, "--image", bad, "--prompt", "hi"], capsys)
    assert code == 2 and "cannot read image" in err


def test_not_an_image(bundle_copy, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    code, _, err = run_cli(["run", bundle_copy, "--image", bad, "--prompt", "hi"], capsys)
    assert code == 2 and "cannot read image" in err


def test_missing_image(bundle_copy, tmp_path, capsys):
    code, _, err = run_cli(["run", bundle_copy, "--image", tmp_path / "nope.png", "--prompt", "hi"], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_non_rgb_images_are_converted(bundle_copy, tmp_path, mode, capsys):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(
        np.random.default_rng(0).integers(0, 65535, (40, 50), dtype=np.uint16))
    p = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(p)
    code, out, _ = run_cli(["run", bundle_copy, "--image", p, "--prompt", "what is it?", "--max-tokens", "3",
                            "--json"], capsys)
    assert code == 0 and json.loads(out)["generated_tokens"] >= 1


def test_missing_bundle_file(bundle_copy, shape_image, capsys):
    (bundle_copy / "vision.onnx").unlink()
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "vision.onnx: missing" in err


def test_sha256_mismatch(bundle_copy, shape_image, capsys):
    f = bundle_copy / "vision.onnx"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    code, _, err = run_cli(["inspect", bundle_copy], capsys)
    assert code == 3 and "sha256 mismatch" in err
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "sha256 mismatch" in err  # the default run hashes a file it has not seen


def test_bit_flip_after_a_verified_load_is_caught(bundle_copy, shape_image, capsys):
    import os

    args = ["run", bundle_copy, "--image", shape_image, "--prompt", "hi", "--max-tokens", "2"]
    assert run_cli(args, capsys)[0] == 0  # first load hashes and remembers the files
    f = bundle_copy / "vision.onnx"
    st = f.stat()
    b = bytearray(f.read_bytes())
    b[len(b) // 3] ^= 0x01
    f.write_bytes(bytes(b))
    code, _, err = run_cli(args, capsys)
    assert code == 3 and "vision.onnx: sha256 mismatch" in err
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even a forged mtime is caught by --verify sha256
    code, _, err = run_cli(args + ["--verify", "sha256"], capsys)
    assert code == 3 and "sha256 mismatch" in err


def test_truncated_gguf_caught_by_size(bundle_copy, shape_image, capsys):
    f = bundle_copy / "llm-q8_0.gguf"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "truncated" in err


def test_truncated_gguf_with_consistent_manifest(bundle_copy, shape_image, capsys):
    """Even if the manifest was rewritten to match, llama.cpp's refusal becomes a clear error."""
    from edge_vlm.manifest import describe_file

    f = bundle_copy / "llm-q8_0.gguf"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"][f.name] = describe_file(f)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "truncated or corrupt" in err


def test_prompt_longer_than_context(bundle_copy, shape_image, capsys):
    long = "why " * 400
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", long, "--n-ctx", "256"], capsys)
    assert code == 2 and "context holds 256" in err


def test_unknown_bits(tmp_path, capsys):
    assert main(["export", "--bits", "5", "-o", str(tmp_path / "x")]) == 2
    assert "invalid choice: 5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_quant_type(tiny_source, tmp_path, capsys):
    code, _, err = run_cli(["export", tiny_source, "--quant", "Q9_X", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "unknown llama.cpp quantization type" in err and not (tmp_path / "x").exists()


def test_not_a_bundle(tmp_path, shape_image, capsys):
    code, _, err = run_cli(["inspect", tmp_path], capsys)
    assert code == 3 and "no manifest.json" in err


def test_embedding_size_mismatch(bundle_copy, shape_image, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["vision"]["n_embd"] = 32
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "n_embd" in err


def test_projection_with_wrong_keys(tiny_source, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    save_file({"weight": torch.zeros(64, 2560), "extra": torch.zeros(3)}, str(src / "projection.safetensors"))
    code, _, err = run_cli(["export", src, "--bits", "16", "-o", tmp_path / "out"], capsys)
    assert code == 4 and "missing keys (1): bias" in err and "unexpected keys (1): extra" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_interrupted_export_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    from edge_vlm.export import llm_gguf
    from edge_vlm.export.run import ExportConfig, run

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_gguf, "quantize", boom)
    with pytest.raises(KeyboardInterrupt):
        run(ExportConfig(source=str(tiny_source), out=str(tmp_path / "b"), bits=8), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_export_is_not_a_bundle(tmp_path, capsys):
    """What a SIGKILL leaves (a hidden partial folder without manifest) is rejected and later cleaned."""
    from edge_vlm.export.bundle import BundleWriter

    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has certainly exited
    partial = tmp_path / f".b.partial-{dead}"
    partial.mkdir()
    (partial / "vision.onnx").write_bytes(b"x")
    (partial / ".edge-vlm-writer").write_text(f"{dead} -\n")  # every export marks its partial folder
    mine = tmp_path / f".data.partial-{dead}"  # a user's own folder that merely looks like one
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = run_cli(["inspect", partial], capsys)
    assert code == 3
    with BundleWriter(tmp_path / "b"):
        assert not partial.exists() and (mine / "notes.txt").exists()


def test_vision_output_not_matching_manifest(bundle_copy, shape_image, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["vision"]["n_image_tokens"] = 3
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi"], capsys)
    assert code == 3 and "vision.onnx produced (1, 2, 64)" in err


def test_max_tokens_alone_overflow_the_context(bundle_copy, shape_image, capsys):
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi", "--n-ctx", "256",
                            "--max-tokens", "300"], capsys)
    assert code == 2 and "context holds 256" in err and "--max-tokens" in err


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--max-tokens", "0")])
def test_bad_sampling_options(bundle_copy, shape_image, capsys, flag, value):
    code, _, err = run_cli(["run", bundle_copy, "--image", shape_image, "--prompt", "hi", flag, value], capsys)
    assert code == 2 and flag.lstrip("-").replace("-", "") in err.replace("-", "").replace("_", "")


@pytest.mark.parametrize("edit,message", [
    (lambda m: [], "does not hold a JSON object"),
    (lambda m: {**m, "format_version": 99}, "format version 99"),
    (lambda m: {**m, "files": {**m["files"], "../evil": {"bytes": 1, "sha256": "0" * 64}}}, "relative path inside"),
    (lambda m: {**m, "files": {k: {"bytes": v["bytes"]} for k, v in m["files"].items()}}, "malformed"),
    (lambda m: {**m, "preprocess": {**m["preprocess"], "resize": "lanczos9"}}, "preprocess.resize"),
])
def test_corrupt_manifest(bundle_copy, capsys, edit, message):
    path = bundle_copy / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    code, _, err = run_cli(["inspect", bundle_copy], capsys)
    assert code == 3 and message in err


def test_force_only_replaces_bundles(tiny_source, tmp_path, capsys):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    code, _, err = run_cli(["export", tiny_source, "--bits", "8", "-o", precious, "--force"], capsys)
    assert code == 2 and "not an edge-vlm bundle" in err and (precious / "holiday.jpg").exists()


def test_failed_forced_export_keeps_the_old_bundle(export_tiny, tiny_source, tmp_path, monkeypatch):
    from edge_vlm.export import llm_gguf
    from edge_vlm.export.run import ExportConfig, run

    target = tmp_path / "b"
    shutil.copytree(export_tiny("Q8_0"), target)
    before = (target / "manifest.json").read_text()
    monkeypatch.setattr(llm_gguf, "quantize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        run(ExportConfig(source=str(tiny_source), out=str(target), bits=8, force=True), progress=False)
    assert (target / "manifest.json").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_broken_rope_permutation_fails_validation(tiny_source, tmp_path, monkeypatch, capsys):
    """Export validation is not decorative: a GGUF with un-permuted Q/K rows is refused."""
    from edge_vlm.export import llm_gguf

    monkeypatch.setattr(llm_gguf, "_permute_rope", lambda w, n_head: w)
    code, _, err = run_cli(["export", tiny_source, "--quant", "F32", "-o", tmp_path / "b"], capsys)
    assert code == 5 and "top1_agreement" in err and not (tmp_path / "b").exists()
