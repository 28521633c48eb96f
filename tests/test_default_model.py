"""The built-in model: its committed projection loads, and the default pipeline really answers."""
import json

import pytest

from edge_vlm.data import load_questions, normalize_answer
from edge_vlm.families import BUILTIN, SOURCE_FILE


def test_committed_projection_matches_the_model():
    from safetensors.numpy import load_file

    from edge_vlm.families.nano import FEATURE_DIM, build_projector, word_slots_class

    root = BUILTIN["nano"]
    desc = json.loads((root / SOURCE_FILE).read_text())
    w = load_file(str(root / desc["projection"]))
    v = desc["vision"]
    want = build_projector(v.get("projector", "linear"), FEATURE_DIM * v["concat"], 576).state_dict()
    if v.get("words"):
        want.update({f"words.{k}": t for k, t in word_slots_class()(v["words"], 576).state_dict().items()})
    assert {k: tuple(t.shape) for k, t in w.items()} == {k: tuple(t.shape) for k, t in want.items()}
    assert (root / "TRAINING.md").is_file() and (root / "training_curve.csv").is_file()
    if desc["llm"].get("adapter"):
        assert (root / desc["llm"]["adapter"]).is_file()


@pytest.fixture(scope="module")
def default_bundle(nano_q4):
    return nano_q4  # the session's default 4-bit export (conftest), shared with the server tests


def test_default_pipeline_answers_known_questions(default_bundle):
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
    from edge_vlm.runtime.sampling import SamplingConfig

    qs = load_questions("easy-vqa", "test", limit=10)
    with Pipeline.load(default_bundle, RuntimeConfig(device="cpu")) as p:
        answers = ["".join(p.generate(q.image, q.text, SamplingConfig(max_tokens=6))) for q in qs]
    correct = sum(normalize_answer(a) == q.answer for a, q in zip(answers, qs))
    assert correct >= 6, list(zip([q.text for q in qs], answers))


def test_default_bundle_answers_shapes_drawn_another_way(default_bundle, tmp_path):
    """Issue 15: the built-in model looks at the image. Shapes drawn by edge_vlm/drawn_shapes.py (not easy-VQA's
    renderer, a seed no training or validation used), with yes/no answers independent of the wording."""
    from edge_vlm.drawn_shapes import DrawnConfig, write
    from edge_vlm.eval import EvalConfig, evaluate

    data = write(tmp_path / "drawn", DrawnConfig(images=12, seed=424242))
    r = evaluate(EvalConfig(target=str(default_bundle), dataset=str(data), split="", limit=None), progress=False)
    assert r["n"] == 36 and r["accuracy"] >= 0.8, r["by_kind"]
    yes_no = [x for x in r["records"] if x["answer"] in ("yes", "no")]
    assert {x["answer"] for x in yes_no} == {"yes", "no"}  # both answers asked, so "always no" cannot pass


@pytest.mark.slow
def test_4bit_accuracy_close_to_reference(default_bundle):
    from edge_vlm.eval import EvalConfig, evaluate

    ref = evaluate(EvalConfig(target="nano", limit=300), progress=False)
    q4 = evaluate(EvalConfig(target=str(default_bundle), limit=300), progress=False)
    assert ref["accuracy"] > 0.8 and q4["accuracy"] >= ref["accuracy"] - 0.03


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gptq", "onnx", "bnb"])
def test_built_in_model_through_each_backend_at_8_bits_answers_like_the_reference(backend, tmp_path):
    """The real model through the non-gguf backends: 8 bits must stay within 3 points of fp32 on
    100 questions (4-bit quality is measured, not asserted: benchmarks/accuracy_backends.py)."""
    from edge_vlm.eval import EvalConfig, evaluate
    from edge_vlm.export.run import ExportConfig, run

    out = run(ExportConfig(out=str(tmp_path / backend), backend=backend, bits=8), progress=False)
    ref = evaluate(EvalConfig(target="nano", limit=100), progress=False)
    got = evaluate(EvalConfig(target=str(out), limit=100), progress=False)
    assert got["accuracy"] >= ref["accuracy"] - 0.03, (ref["accuracy"], got["accuracy"])


def test_a_first_run_prints_our_output_not_dependencies_warnings(tmp_path):
    """`edge-vlm eval nano` loads transformers, the GGUF reader and (through transformers) torchao: none of
    their warnings, logs or progress bars reach the terminal unless asked for (--verbose)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_VLM_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS",
                                                            "TRANSFORMERS_VERBOSITY")}
    p = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "eval", "nano", "--limit", "2"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    noise = ("Warning", "torchvision", "Converting and de-quantizing", "Loading weights", "Failed to load",
             "W1", "deprecated")
    seen = [line for line in (p.stdout + p.stderr).splitlines() if any(n in line for n in noise)]
    assert not seen, seen
    assert "accuracy" in p.stdout
