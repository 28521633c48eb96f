import json
import subprocess

import pytest
import sys

from edge_vlm.cli import main


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t=time.perf_counter(); from edge_vlm.cli import build_parser; "
            "build_parser().format_help(); print(time.perf_counter()-t, 'torch' in sys.modules, "
            "'onnxruntime' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False", "False"]
    assert float(out[0]) < 2.0  # typically ~0.05 s; generous so a loaded CI machine cannot flake


def test_help_cli_exit_code():
    p = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "export" in p.stdout and "examples:" in p.stdout


def test_run_json_and_stream(export_tiny, shape_image, capsys):
    b = export_tiny("Q8_0")
    assert main(["run", str(b), "--image", str(shape_image), "--prompt", "what?", "--max-tokens", "4",
                 "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["image_tokens"] == 2 and r["generated_tokens"] >= 1
    assert {"preprocess_ms", "vision_ms", "ttft_ms", "total_ms"} <= set(r["timings_ms"])
    assert main(["run", str(b), "--image", str(shape_image), "--prompt", "what?", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == r["text"].strip()


def test_inspect_verifies_hashes(export_tiny, capsys):
    assert main(["inspect", str(export_tiny("Q8_0"))]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 2 and "Q8_0" in out
    assert main(["inspect", str(export_tiny("Q8_0")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llm"]["backend"] == "gguf"


def test_device_cuda_without_gpu_builds_says_what_to_install(export_tiny, shape_image, capsys):
    from edge_vlm.runtime import device

    if device.ort_has_cuda() and device.llama_has_gpu():
        pytest.skip("GPU builds installed: covered by test_gpu.py")
    code = main(["run", str(export_tiny("Q8_0")), "--image", str(shape_image), "--prompt", "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 6 and "pip install" in err
    plan = device.resolve("auto")
    assert plan.notes and plan.summary


def test_eval_reports_accuracy_on_a_folder_dataset(export_tiny, tmp_path, shape_image, capsys):
    import shutil

    (tmp_path / "images").mkdir()
    shutil.copy(shape_image, tmp_path / "images" / "0.png")
    (tmp_path / "questions.json").write_text(json.dumps([["what shape is it?", "circle", 0], ["is it red?", "no", 0]]))
    assert main(["eval", str(export_tiny("Q8_0")), "--dataset", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 2 and 0 <= r["accuracy"] <= 1 and set(r["by_kind"]) == {"shape", "yes/no"}


def test_runtime_never_imports_torch(export_tiny, shape_image):
    code = (f"import sys, edge_vlm; p = edge_vlm.Pipeline.load({str(export_tiny('Q8_0'))!r}); "
            f"print(''.join(p.generate({str(shape_image)!r}, 'what?')), file=sys.stderr); p.close(); "
            "bad = [m for m in ('torch', 'transformers', 'edge_vlm.families', 'edge_vlm.reference') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_export_recipe_and_flag_override(tiny_source, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'source = "{tiny_source}"\nbits = 16\n')
    assert main(["export", "--recipe", str(recipe), "--bits", "8", "-o", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llm"]["quant"]["requested"] == "Q8_0"
    recipe.write_text('sauce = "nano"\n')
    assert main(["export", "--recipe", str(recipe), "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "sauce" in err and "unknown field" in err
