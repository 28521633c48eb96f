"""The bad-input table: every case runs the real `edge-vlm` command in its own process and must end
with the expected exit code, exactly one error line, no traceback, no signal and no hang."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TIMEOUT_S = 120  # a hang fails the case; a normal case takes a few seconds


def _cases(bundle: Path, source: Path, image: Path, work: Path):
    """(name, argv, exit code, words the error line must hold). Files the cases need are made here."""
    text_file = work / "notes.txt"
    text_file.write_text("not a folder")
    list_source = work / "list-source"
    list_source.mkdir()
    (list_source / "edge-vlm-source.json").write_text("[1, 2, 3]")
    zero_size = work / "zero-size"
    zero_size.mkdir()
    desc = json.loads((source / "edge-vlm-source.json").read_text())
    (zero_size / "edge-vlm-source.json").write_text(json.dumps({**desc, "image_size": 0}))
    trusting = work / "trusting"
    trusting.mkdir()
    (trusting / "edge-vlm-source.json").write_text(json.dumps({**desc, "trust_checkpoint": True}))
    recipe = work / "trust.toml"
    recipe.write_text('bits = 4\ntrust_checkpoint = true\n')
    bad_recipe = work / "types.toml"
    bad_recipe.write_text('bits = "four"\n')
    bad_json_ds = work / "ds-json"
    (bad_json_ds / "images").mkdir(parents=True)
    (bad_json_ds / "questions.json").write_text("{not json")
    bad_rows_ds = work / "ds-rows"
    (bad_rows_ds / "images").mkdir(parents=True)
    (bad_rows_ds / "questions.json").write_text('[["what?", 3]]')
    zero_std = work / "zero-std"
    import shutil

    shutil.copytree(bundle, zero_std)
    m = json.loads((zero_std / "manifest.json").read_text())
    m["preprocess"]["std"] = [0, 0, 0]
    (zero_std / "manifest.json").write_text(json.dumps(m))
    string_stop = work / "string-stop"
    shutil.copytree(bundle, string_stop)
    m = json.loads((string_stop / "manifest.json").read_text())
    m["prompt"]["stop"] = "###"
    (string_stop / "manifest.json").write_text(json.dumps(m))
    loop = work / "loop"
    os.symlink(loop, loop)  # a symbolic link to itself
    fifo = work / "recipe.toml"
    os.mkfifo(fifo)  # reading it would block forever
    bad_config = work / "bad-config"
    (bad_config / "phi").mkdir(parents=True)
    (bad_config / "phi" / "config.json").write_text("[]")
    (bad_config / "edge-vlm-source.json").write_text(json.dumps(
        {"family": "tinygpt-v", "vit": "v.pth", "qformer": "q.pth", "ckpt": "c.pth", "llm": "phi"}))
    run = ["run", bundle, "--image", image, "--prompt", "what color?", "--max-tokens", "2"]
    return [
        ("run --n-ctx 1", run + ["--n-ctx", "1"], 2, "--n-ctx 1"),
        ("align --words with a one-word group", ["align", "--words", "red;circle,square"], 2, "word group"),
        ("align --init of a missing file", ["align", "--init", work / "none.safetensors"], 2, "--init"),
        ("run --n-ctx -5", run + ["--n-ctx", "-5"], 2, "--n-ctx"),
        ("run --n-ctx beyond the model", run + ["--n-ctx", "100000"], 2, "model's context"),
        ("run --temperature nan", run + ["--temperature", "nan"], 2, "--temperature"),
        ("run --temperature inf", run + ["--temperature", "inf"], 2, "--temperature"),
        ("run --top-p 2", run + ["--top-p", "2"], 2, "--top-p"),
        ("run --seed -2", run + ["--seed", "-2"], 2, "--seed"),
        ("run --threads -1", run + ["--threads", "-1"], 2, "--threads"),
        ("run --max-tokens 0", run + ["--max-tokens", "0"], 2, "--max-tokens"),
        ("run prompt not UTF-8", ["run", bundle, "--image", image, "--prompt", b"caf\xe9 \xff?"], 2, "UTF-8"),
        ("run image is a folder", ["run", bundle, "--image", work, "--prompt", "hi"], 2, "image"),
        ("run image is text", ["run", bundle, "--image", text_file, "--prompt", "hi"], 2, "cannot read image"),
        ("run no such bundle", ["run", work / "nope", "--image", image, "--prompt", "hi"], 3, "not a bundle"),
        ("run std of zeros", ["run", zero_std, "--image", image, "--prompt", "hi"], 3, "preprocess.std"),
        ("run stop is a string", ["run", string_stop, "--image", image, "--prompt", "hi"], 3, "prompt.stop"),
        ("inspect std of zeros", ["inspect", zero_std], 3, "preprocess.std"),
        ("plan std of zeros", ["plan", zero_std, "--device", "cpu:8"], 3, "preprocess.std"),
        ("plan --context 0", ["plan", bundle, "--device", "cpu:8", "--context", "0"], 2, "--context"),
        ("bench --runs 0", ["bench", bundle, "--runs", "0"], 2, "--runs"),
        ("eval --limit -5", ["eval", bundle, "--limit", "-5"], 2, "--limit"),
        ("eval questions not JSON", ["eval", bundle, "--dataset", bad_json_ds], 2, "questions.json"),
        ("eval rows of the wrong shape", ["eval", bundle, "--dataset", bad_rows_ds], 2, "questions.json"),
        ("export -o under a file", ["export", source, "--bits", "8", "-o", text_file / "b"], 2, str(text_file)),
        ("export source JSON is a list", ["export", list_source, "--bits", "8", "-o", work / "o1"], 4,
         "edge-vlm-source.json"),
        ("export image_size 0", ["export", zero_size, "--bits", "8", "-o", work / "o2"], 4, "image_size"),
        ("export folder trusts itself", ["export", trusting, "--bits", "8", "-o", work / "o3"], 4,
         "--trust-checkpoint"),
        ("export recipe trusts", ["export", source, "--recipe", recipe, "-o", work / "o4"], 2, "--trust-checkpoint"),
        ("export recipe types", ["export", source, "--recipe", bad_recipe, "-o", work / "o5"], 2, "bits"),
        ("export --group-size 0", ["export", source, "--group-size", "0", "-o", work / "o6"], 2, "--group-size"),
        ("inspect a symlink loop", ["inspect", loop], 3, "not a bundle"),
        ("run a symlink loop", ["run", loop, "--image", image, "--prompt", "hi"], 3, "not a bundle"),
        ("export --vit a symlink loop", ["export", "--family", "tinygpt-v", "--vit", loop, "--qformer", loop,
                                         "--ckpt", loop, "--llm", loop, "-o", work / "o7"], 2, "--vit"),
        ("export recipe is a FIFO", ["export", source, "--recipe", fifo, "-o", work / "o8"], 2, "not a regular file"),
        ("run --threads 3e9", run + ["--threads", "3000000000"], 2, "--threads"),
        ("plan a source whose LLM config is a list", ["plan", bad_config, "--device", "cpu:8"], 4, "config.json"),
        ("eval --out is a folder", ["eval", bundle, "--out", work], 2, "--out"),
        ("bench --out-dir under a file", ["bench", bundle, "--out-dir", text_file / "r"], 2, "--out-dir"),
        ("synth into a file", ["synth", "--family", "tinygpt-v", "--size", "mini", "-o", text_file], 2, "notes.txt"),
    ]


def _run(argv):
    args = [sys.executable, "-m", "edge_vlm.cli"] + [a if isinstance(a, bytes) else str(a) for a in argv]
    env = {**os.environ, "EDGE_VLM_DEBUG": "", "PYTHONWARNINGS": "ignore"}
    try:
        p = subprocess.run(args, capture_output=True, timeout=TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, "", f"hung for more than {TIMEOUT_S} s"
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def test_bad_input_table(export_tiny, tiny_source, shape_image, tmp_path):
    cases = _cases(export_tiny("Q8_0"), tiny_source, shape_image, tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: _run(c[1]), cases))
    failures = []
    for (name, _, want, words), (code, out, err) in zip(cases, results):
        error_lines = [ln for ln in err.splitlines() if "error:" in ln]
        problems = [p for p, bad in (
            (f"exit {code}, want {want}", code != want),
            ("traceback", "Traceback" in err),
            ("killed by a signal", code is not None and code < 0),
            (f"{len(error_lines)} error lines", len(error_lines) != 1),
            (f"error line lacks {words!r}", not any(words in ln for ln in error_lines)),
        ) if bad]
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    {err.strip()[-600:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def test_threads_beyond_the_cores_are_capped_with_a_note(export_tiny, shape_image):
    code, out, err = _run(["run", export_tiny("Q8_0"), "--image", shape_image, "--prompt", "hi", "--max-tokens", "2",
                           "--threads", "4096", "--json"])
    assert code == 0 and "capped at this machine's" in err and json.loads(out)["generated_tokens"] >= 1


def test_seed_minus_one_means_random(export_tiny, shape_image):
    code, out, _ = _run(["run", export_tiny("Q8_0"), "--image", shape_image, "--prompt", "hi", "--max-tokens", "2",
                         "--temperature", "0.7", "--seed", "-1", "--json"])
    assert code == 0 and json.loads(out)["generated_tokens"] >= 1


@pytest.mark.parametrize("prompt", ["bad \udcff surrogate", "\ud800"])
def test_prompt_that_is_not_unicode_text_through_the_api(export_tiny, shape_image, prompt):
    from edge_vlm.errors import BadInput
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    with Pipeline.load(export_tiny("Q8_0"), RuntimeConfig(device="cpu")) as p:
        with pytest.raises(BadInput, match="UTF-8"):
            p.answer(shape_image, prompt)
        with pytest.raises(BadInput, match="UTF-8"):
            "".join(p.generate(shape_image, prompt))


def test_prompt_holding_the_image_marker_cannot_move_the_image():
    from edge_vlm.manifest import PromptSpec

    spec = PromptSpec(template="User: {prompt} <ImageHere> Assistant:")
    assert spec.render("look <ImageHere> here") == ("User: look <ImageHere> here ", " Assistant:")
