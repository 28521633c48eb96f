"""A manifest fuzzer of our own: hypothesis mutates real bundles' manifests (types, values, nesting,
missing and extra keys) and everything that reads a bundle (`inspect`, `plan`, `run`) must either
work or raise a typed `edge_vlm.errors` error -- never a TypeError, a RecursionError, a hang or a
native abort. The default run takes a few hundred examples; `-m fuzz` takes 10,000."""
import json
import math
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_vlm.errors import EdgeVLMError

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# any JSON value, including the ones a careless or hostile writer produces
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.nan, math.inf]),
    st.text(max_size=40), st.sampled_from(["", "../../etc/passwd", "/etc/passwd", "a/../../b", "x\\y", "\x00",
                                           "<ImageHere>", "{prompt}", "gguf", "onnx", "gptq", "bnb", "fp16",
                                           "vision.onnx", "llm.onnx", "tokenizer.json"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)


def _paths(obj, prefix=()):
    """Every key path in a parsed manifest (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, path, op, value):
    if not path:
        return value if op != "nest" else _nest(obj)
    *head, last = path
    parent = obj
    for k in head:
        parent = parent[k]
    if op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "nest":
        parent[last] = _nest(parent[last])
    elif op == "wrap":
        parent[last] = [parent[last]]
    elif op == "extra" and isinstance(parent, dict):
        parent[str(value)[:12] + "_x"] = value
    else:
        parent[last] = value
    return obj


def _nest(x, depth=400):
    for _ in range(depth):
        x = [x]
    return x


def mutations(base: dict):
    paths = list(_paths(base))
    one = st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "replace", "delete", "nest", "wrap", "extra"]),
                    json_values)
    return st.lists(one, min_size=1, max_size=3)


def _apply(base, muts):
    m = json.loads(json.dumps(base))
    for path, op, value in muts:
        try:
            m = _mutate(m, path, op, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped that path
    return m


def _write(bundle, m):
    (bundle / "manifest.json").write_text(json.dumps(m, allow_nan=True))


def _readers(bundle, image, full: bool):
    """What reads a bundle: its manifest + file checks, inspect, plan and (full) a short run."""
    from edge_vlm.cli import main
    from edge_vlm.manifest import load_manifest, verify_files
    from edge_vlm.plan.shapes import from_bundle

    for call in (lambda: verify_files(bundle, load_manifest(bundle), hashes="size"), lambda: from_bundle(bundle)):
        try:
            call()
        except EdgeVLMError:
            pass
    for argv in (["inspect", str(bundle)], ["plan", str(bundle), "--device", "cpu:8", "--json"]):
        code = main(argv)
        assert code in (0, 2, 3), (argv, code)
    if full:
        code = main(["run", str(bundle), "--image", str(image), "--prompt", "what?", "--max-tokens", "2",
                     "--device", "cpu", "--verify", "size", "--json"])
        assert code in (0, 2, 3), code


@pytest.fixture
def debug_env(monkeypatch):
    """Untyped exceptions escape the CLI's last-resort handler, so the fuzzer sees them."""
    monkeypatch.setenv("EDGE_VLM_DEBUG", "1")


@pytest.fixture(params=["gguf", "onnx"])
def fuzz_bundle(request, export_tiny, export_backend, tmp_path):
    src = export_tiny("Q8_0") if request.param == "gguf" else export_backend("onnx", 4)
    dst = tmp_path / f"fuzz-{request.param}"
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def _fuzz(fuzz_bundle, shape_image, capsys, n: int, full_every: int):
    bundle, base = fuzz_bundle
    count = {"n": 0}

    @settings(max_examples=n, **SETTINGS)
    @given(mutations(base))
    def check(muts):
        count["n"] += 1
        _write(bundle, _apply(base, muts))
        _readers(bundle, shape_image, full=count["n"] % full_every == 0)
        capsys.readouterr()  # keep pytest's capture buffer small

    check()
    assert count["n"] >= min(n, 50)


def test_manifest_fuzz(fuzz_bundle, shape_image, capsys, debug_env):
    _fuzz(fuzz_bundle, shape_image, capsys, n=150, full_every=5)


@pytest.mark.fuzz
def test_manifest_fuzz_long(fuzz_bundle, shape_image, capsys, debug_env):
    _fuzz(fuzz_bundle, shape_image, capsys, n=int(os.environ.get("EDGE_VLM_FUZZ_N", 10_000)) // 2, full_every=20)


# --- the cases the issue saw, written out: each is refused by the schema with a clear message ----------
@pytest.mark.parametrize("edit,words", [
    (lambda m: m["preprocess"].update(std=[0, 0, 0]), "preprocess.std"),
    (lambda m: m["preprocess"].update(mean=[math.nan, 0.5, 0.5]), "preprocess.mean"),
    (lambda m: m["prompt"].update(stop="###"), "prompt.stop"),
    (lambda m: m["prompt"].update(template="no image marker {prompt}"), "exactly once"),
    (lambda m: m["prompt"].update(template="<ImageHere> <ImageHere> {prompt}"), "exactly once"),
    (lambda m: m["vision"].update(n_image_tokens="2"), "vision.n_image_tokens"),
    (lambda m: m["vision"].update(n_image_tokens=10 ** 30), "vision.n_image_tokens"),
    (lambda m: m["llm"].update(n_embd=-64), "llm.n_embd"),
    (lambda m: m["llm"].update(file="/etc/passwd"), "inside the bundle"),
    (lambda m: m["vision"].update(file="../vision.onnx"), "inside the bundle"),
    (lambda m: m["llm"]["quant"].update(tensor_types=[]), "llm.quant.tensor_types"),
    (lambda m: m.update(validation=[]), "validation"),
    (lambda m: m.update(source="x"), "source"),
    (lambda m: m["files"].update({"extra.bin": {"bytes": -1, "sha256": "0" * 64}}), "bytes"),
    (lambda m: m.update(unknown_field=1), "unknown_field"),
    (lambda m: m["vision"].update(file="other.onnx"), "does not list"),
])
def test_bad_manifest_values_are_named(fuzz_bundle, capsys, edit, words):
    bundle, base = fuzz_bundle
    m = json.loads(json.dumps(base))
    edit(m)
    _write(bundle, m)
    from edge_vlm.cli import main

    code = main(["inspect", str(bundle)])
    err = capsys.readouterr().err
    assert code == 3 and words in err and "Traceback" not in err, err


def test_deep_nesting_and_huge_files_are_refused(fuzz_bundle, capsys):
    from edge_vlm.cli import main

    bundle, base = fuzz_bundle
    (bundle / "manifest.json").write_text(json.dumps(base)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["inspect", str(bundle)]) == 3 and "not valid JSON" in capsys.readouterr().err
    (bundle / "manifest.json").write_text(json.dumps({**base, "validation": {"x": _nest(1, 200)}}))
    assert main(["inspect", str(bundle)]) == 3 and "nested" in capsys.readouterr().err
    (bundle / "manifest.json").write_text(json.dumps({**base, "n": 1}) + " " * (17 << 20))
    assert main(["inspect", str(bundle)]) == 3 and "far more than a manifest" in capsys.readouterr().err
    (bundle / "manifest.json").write_text(json.dumps(base).replace('"format_version": 1', '"format_version": '
                                                                   + "9" * 5000))
    assert main(["inspect", str(bundle)]) == 3 and "Traceback" not in capsys.readouterr().err


def test_today_s_bundles_still_load(fuzz_bundle):
    from edge_vlm.manifest import load_manifest, verify_files

    bundle, _ = fuzz_bundle
    m = load_manifest(bundle)
    assert verify_files(bundle, m) and m.llm.quant.bits in (4, 8)


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinked_bundle_files_are_refused(fuzz_bundle, shape_image, tmp_path, capsys, target):
    """A listed file that is a link (to /etc/passwd, or even to another file of the bundle) is refused by
    inspect and run, even with a re-signed manifest."""
    from edge_vlm.cli import main
    from edge_vlm.manifest import describe_file

    bundle, base = fuzz_bundle
    victim = "tokenizer.json" if (bundle / "tokenizer.json").exists() else "vision.onnx"
    real = bundle / victim
    elsewhere = tmp_path / "elsewhere.bin"
    shutil.copy(real, elsewhere)
    real.unlink()
    os.symlink(elsewhere if target == "outside" else bundle / "manifest.json", real)
    m = json.loads(json.dumps(base))
    m["files"][victim] = describe_file(real)  # re-signed: sizes and hashes match the link's target
    (bundle / "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", str(bundle)], ["run", str(bundle), "--image", str(shape_image), "--prompt", "hi"]):
        assert main(argv) == 3
        assert "symbolic link" in capsys.readouterr().err


def test_a_symlinked_manifest_is_refused(fuzz_bundle, tmp_path, capsys):
    from edge_vlm.cli import main

    bundle, _ = fuzz_bundle
    outside = tmp_path / "m.json"
    shutil.move(bundle / "manifest.json", outside)
    os.symlink(outside, bundle / "manifest.json")
    assert main(["inspect", str(bundle)]) == 3 and "not a regular file" in capsys.readouterr().err
