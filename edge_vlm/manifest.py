"""The bundle contract: `manifest.json` plus the files it lists (with size and sha256).

This is the only thing the runtime knows about a model. It imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_vlm.errors import BundleError

FORMAT = "edge-vlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESIZE_METHODS = ("bicubic", "bilinear", "nearest")
# what a manifest may be: a few kB today; bounds keep a hostile file from costing memory or recursion
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_FILES = 10_000

# --- field types: every number finite and within sane bounds, every name non-empty ---------------
Finite = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=10_000)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Count = Annotated[int, Field(ge=1, le=1 << 20)]
TokenId = Annotated[int, Field(ge=0, le=1 << 24)]
_SEGMENT = re.compile(r"[^/\\\x00]+")


def is_inside(name: str) -> bool:
    """A plain relative path ("a/b.onnx") that stays inside the bundle folder: no absolute path,
    no backslash, no '.', '..' or empty segment, no NUL."""
    return bool(name) and all(_SEGMENT.fullmatch(p) and p not in (".", "..") for p in name.split("/"))


def _bundle_path(name: str) -> str:
    if not is_inside(name):
        raise ValueError(f"{name[:80]!r} is not a relative path inside the bundle folder")
    return name


BundlePath = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_bundle_path)]


class _Section(BaseModel):
    """A manifest section: unknown keys are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Record(BaseModel):
    """A record of facts written at export (quantization, validation): the fields edge-vlm reads are
    typed; other keys are kept as they are, for people and tools reading the manifest."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Preprocess(_Section):
    """How an image becomes the vision model's input (applied by preprocess.py)."""

    image_size: Annotated[int, Field(ge=8, le=8192)]
    # per channel; pixels are scaled to [0, 1] first, so sane values are small
    mean: Annotated[list[Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(ge=1e-4, le=100, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    resize: Literal["bicubic", "bilinear", "nearest"] = "bicubic"  # direct resize to a square, no crop
    color: Literal["RGB"] = "RGB"


class VisionShapeSpec(_Section):
    """What `edge-vlm plan` needs of the vision model: parameters and encoder geometry."""

    params: Annotated[int, Field(ge=0, le=1 << 40)]
    seq: Count
    width: Count
    mlp: Count
    heads: Count


class VisionSpec(_Section):
    file: BundlePath
    input_name: Name
    output_name: Name
    n_image_tokens: Annotated[int, Field(ge=1, le=1 << 16)]
    n_embd: Annotated[int, Field(ge=1, le=1 << 17)]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    # fp16 only: "cuda" = a true fp16 graph (fp16 compute on a GPU); "cpu" = fp16 weights cast to fp32 at load
    built_for: Literal["cpu", "cuda"] | None = None
    shape: VisionShapeSpec | None = None

    _empty_shape = field_validator("shape", mode="before")(lambda v: v or None)  # {} in older bundles


class QuantSpec(_Record):
    """What the LLM was quantized to, and the real mix of tensor types (bits per weight, n_params)."""

    requested: Name | None = None
    bits: Annotated[int, Field(ge=1, le=32)] | None = None
    method: Text | None = None
    group_size: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    calibration: Text | None = None
    tensor_types: dict[Name, Fraction] = Field(default_factory=dict, max_length=256)
    bits_per_weight: Annotated[float, Field(ge=0, le=64, allow_inf_nan=False)] | None = None
    n_params: Annotated[int, Field(ge=0, le=1 << 44)] | None = None


class TokenizerSpec(_Section):
    """Backends whose model file carries no tokenizer (onnx): tokenizer.json and the ids the runtime needs."""

    file: BundlePath
    embed_tokens: BundlePath | None = None
    bos_id: TokenId | None = None
    eog_ids: Annotated[list[TokenId], Field(max_length=1024)] = Field(default_factory=list)
    clean_up_tokenization_spaces: bool = False



class LLMShapeSpec(_Section):
    """The LLM's KV-cache geometry (plan)."""

    arch: Name
    hidden: Annotated[int, Field(ge=1, le=1 << 17)]
    layers: Annotated[int, Field(ge=1, le=4096)]
    heads: Annotated[int, Field(ge=1, le=4096)]
    kv_heads: Annotated[int, Field(ge=1, le=4096)]
    ff: Annotated[int, Field(ge=1, le=1 << 20)]
    vocab: Annotated[int, Field(ge=1, le=1 << 24)]
    tied: bool = False

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} do not divide")
        return self


class OnnxGraphSpec(_Section):
    """The onnx backend's decoder graph: fused (export/decoder_graph.py) or traced (older bundles)."""

    kind: Literal["fused", "traced"]
    dtype: Literal["float32", "float16"] = "float32"  # activations and KV cache
    rotary: Literal["inside attention", "plain ops"] | None = None


class LLMSpec(_Section):
    backend: Literal["gguf", "onnx", "gptq", "bnb"]  # edge_vlm.backends.BACKENDS (a newer edge-vlm may know more)
    file: BundlePath  # a file (gguf, onnx) or a folder of files (gptq, bnb checkpoints) inside the bundle
    arch: Name  # the HF model_type of the source LLM
    n_embd: Annotated[int, Field(ge=1, le=1 << 17)]
    n_ctx_train: Annotated[int, Field(ge=0, le=1 << 24)]  # 0: unknown
    quant: QuantSpec = Field(default_factory=QuantSpec)
    tokenizer: TokenizerSpec | None = None
    shape: LLMShapeSpec | None = None
    onnx_graph: OnnxGraphSpec | None = None  # onnx backend only

    _empty = field_validator("tokenizer", "shape", mode="before")(lambda v: v or None)  # {} in older bundles


class PromptSpec(_Section):
    """`template` holds `{prompt}` once for the user text and `image_marker` once where the image goes."""

    template: Annotated[str, Field(min_length=1, max_length=100_000)]
    image_marker: Annotated[str, Field(min_length=1, max_length=64)] = "<ImageHere>"
    add_bos: bool = False
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=64)] = \
        Field(default_factory=list)

    @model_validator(mode="after")
    def _markers_once(self):
        if self.image_marker == "{prompt}" or self.image_marker in "{prompt}":
            raise ValueError(f"image_marker {self.image_marker!r} collides with the {{prompt}} placeholder")
        for what, n in ((self.image_marker, self.template.count(self.image_marker)),
                        ("{prompt}", self.template.count("{prompt}"))):
            if n != 1:
                raise ValueError(f"template must hold {what!r} exactly once (it holds it {n} times)")
        return self

    def render(self, prompt: str) -> tuple[str, str]:
        """Text before and after the image embeddings, user prompt filled in. The template is split
        at its image marker first, so a prompt that itself contains the marker cannot move the image."""
        before, _, after = self.template.partition(self.image_marker)
        return before.replace("{prompt}", prompt), after.replace("{prompt}", prompt)


class SourceInfo(_Record):
    description: Text = ""
    path: Annotated[str, Field(max_length=4096)] = ""  # where the source was on the exporting machine
    name: Annotated[str, Field(max_length=4096)] = ""


class VisionCheck(_Record):
    max_abs_diff: dict[Name, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(min_length=1, max_length=64)
    atol: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class AgreementCheck(_Record):
    tokens: Annotated[int, Field(ge=0, le=1 << 20)]
    top1_agreement: Fraction
    top5_agreement: Fraction | None = None
    min_agreement: Fraction | dict[Name, Fraction] | None = None


class LogitsCheck(_Record):
    logits_max_abs_diff: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    logits_atol: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    top1_agreement: Fraction


class Validation(_Record):
    """What the export checked, with the figures (the rest of the keys are kept as written)."""

    vision: VisionCheck | None = None
    llm: AgreementCheck | None = None
    llm_fp32: LogitsCheck | None = None
    backend_choice: Text | None = None
    notes: Annotated[list[Text], Field(max_length=64)] = Field(default_factory=list)


class FileRecord(_Section):
    bytes: Annotated[int, Field(ge=0, le=1 << 44)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


WEIGHT_SUFFIXES = (".gguf", ".onnx", ".data", ".safetensors", ".bin")


def llm_weight_files(m: "Manifest") -> dict[str, int]:
    """{file: bytes} of the LLM's weights: its file, an onnx file's external data beside it (llm.onnx.data),
    or the files of its checkpoint folder (gptq, bnb)."""
    name = m.llm.file
    return {f: r.bytes for f, r in m.files.items()
            if (f == name or f.startswith((name + "/", name + "."))) and f.endswith(WEIGHT_SUFFIXES)}


class Manifest(_Section):
    family: Name
    source: SourceInfo
    preprocess: Preprocess
    vision: VisionSpec
    llm: LLMSpec
    prompt: PromptSpec
    edge_vlm_version: Name
    validation: Validation = Field(default_factory=Validation)
    files: dict[BundlePath, FileRecord] = Field(default_factory=dict, max_length=MAX_FILES)
    format: Literal["edge-vlm-bundle"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION

    def used_files(self) -> list[str]:
        """The files (or folders) the runtime opens."""
        t = self.llm.tokenizer
        return [self.vision.file, self.llm.file] + ([t.file] + ([t.embed_tokens] if t.embed_tokens else []) if t else [])

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Validate a parsed manifest.json once; every later reader gets typed, bounded values."""
        if not isinstance(d, dict):
            raise BundleError("manifest.json does not hold a JSON object: export the bundle again")
        if d.get("format") != FORMAT:
            raise BundleError(f"not an edge-vlm bundle manifest (format={str(d.get('format'))[:40]!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {str(d.get('format_version'))[:20]} is not readable by this "
                              f"edge-vlm (reads {FORMAT_VERSION}): re-export it with this version")
        depth, all_text = _scan(d)
        if depth > MAX_DEPTH:
            raise BundleError(f"manifest.json is nested more than {MAX_DEPTH} levels deep: it was not written by "
                              "edge-vlm; export the bundle again")
        if not all_text:
            raise BundleError("manifest.json holds a string that is not Unicode text (a lone surrogate escape): "
                              "it was not written by edge-vlm; export the bundle again")
        try:
            m = cls.model_validate(d, strict=True)
        except ValidationError as e:
            raise BundleError(f"manifest.json is malformed: {describe_errors(e)}. Export the bundle again") from None
        missing = [f for f in m.used_files() if f not in m.files and not any(n.startswith(f + "/") for n in m.files)]
        if missing:
            raise BundleError(f"manifest.json uses {', '.join(missing)} but does not list it in its files: "
                              "export the bundle again")
        return m


def describe_errors(e: ValidationError, limit: int = 3) -> str:
    """pydantic's errors as one line: `where: what` for the first few."""
    parts = []
    for err in e.errors(include_url=False)[:limit]:
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{where[:120]}: {err['msg'][:200]}")
    more = e.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _scan(obj, limit: int = MAX_DEPTH + 1) -> tuple[int, bool]:
    """(nesting depth, whether every key and string encodes as UTF-8) of parsed JSON, in one iterative walk
    (a hostile file must not exhaust the stack; JSON's \\ud800 escapes decode to lone surrogates)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if d >= limit:
            return d, True
        if isinstance(x, dict):
            stack.extend((k, d) for k in x)
            stack.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return deepest, False
    return deepest, True


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_manifest(bundle: Path) -> Manifest:
    """Read and validate `bundle/manifest.json` (a regular file of bounded size, valid JSON, the schema)."""
    bundle = Path(bundle)
    _restore_parked(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle folder: create one with `edge-vlm export -o {bundle}`")
    try:
        link = path.is_symlink()  # raises on a folder this user cannot search (Python 3.11)
    except OSError as e:
        raise BundleError(f"cannot read {path} ({e.strerror or e}): check the folder's permissions") from None
    if link or (path.exists() and not path.is_file()):
        raise BundleError(f"{path} is not a regular file (a link or a device): edge-vlm reads only plain files "
                          "inside a bundle; export it again")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}: it is not a finished bundle "
                          "(an interrupted export leaves none); export it again")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes, far more than a manifest "
                              f"(at most {MAX_MANIFEST_BYTES >> 20} MB): export the bundle again")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, integers too long to convert, nesting
        raise BundleError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:160]}): "
                          "export the bundle again") from None
    except OSError as e:
        raise BundleError(f"cannot read {path} ({e.strerror or e}): check the folder's permissions") from None
    return Manifest.from_dict(data)


def _restore_parked(bundle: Path) -> None:
    """An export killed while replacing this bundle (--force) left the old one parked beside it: put it back."""
    try:
        from edge_vlm.export.bundle import restore_parked
    except ImportError:  # pragma: no cover - the export package is part of edge-vlm
        return
    restore_parked(bundle)  # never raises: a folder it cannot fix is reported by the checks below


VERIFY_MODES = ("once", "sha256", "size")


def check_regular_inside(bundle: Path, name: str) -> Path | None:
    """`bundle/name` if it is a regular file reached without following a link and inside the bundle;
    None if it does not exist; raises BundleError for a link, a device, a FIFO or a path that leaves."""
    root = Path(bundle)
    p = root
    for part in name.split("/"):
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BundleError(f"cannot read {p} ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{name} in bundle {bundle} is a symbolic link: bundles hold only their own regular "
                              "files (a link could point anywhere on this machine). Export the bundle again")
    if not os.path.isfile(p):
        raise BundleError(f"{name} in bundle {bundle} is not a regular file: export the bundle again")
    real, base = os.path.realpath(p), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise BundleError(f"{name} resolves outside bundle {bundle}: export the bundle again")
    return p


def _stamp_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-vlm" / "verified.json"


def _load_stamps() -> dict:
    try:
        stamps = json.loads(_stamp_file().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return stamps if isinstance(stamps, dict) else {}  # a damaged cache only costs re-hashing


def _save_stamps(stamps: dict) -> None:
    try:
        f = _stamp_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamps))
        tmp.replace(f)
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def verify_files(bundle: Path, manifest: Manifest, hashes: bool | str = True) -> list[dict]:
    """Check every listed file exists with the recorded size and sha256.

    `hashes`: True/"sha256" hash every file; "once" hash a file the first time this exact file
    (path, size, mtime) is seen and remember it in ~/.cache/edge-vlm/verified.json; False/"size"
    check sizes only. Returns one row per file; raises BundleError naming every bad file.
    """
    mode = {True: "sha256", False: "size"}.get(hashes, hashes)
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}")
    stamps = _load_stamps() if mode == "once" else {}
    rows, bad, changed = [], [], False
    folder = Path(bundle) / manifest.llm.file
    if folder.is_dir() and not folder.is_symlink():
        # a checkpoint folder: a file in it that the manifest does not list would be loaded unchecked
        extra = sorted(p.relative_to(bundle).as_posix() for p in folder.rglob("*")
                       if (p.is_file() or p.is_symlink()) and p.relative_to(bundle).as_posix() not in manifest.files)
        if extra:
            bad.append(f"{manifest.llm.file}/ holds files the manifest does not list: {', '.join(extra[:5])}")
    for name, rec in manifest.files.items():
        p = check_regular_inside(Path(bundle), name)
        row = {"file": name, "bytes": rec.bytes, "sha256": rec.sha256, "status": "ok"}
        try:
            if p is None:
                row["status"] = "missing"
            elif p.stat().st_size != rec.bytes:
                row["status"] = f"size {p.stat().st_size} != {rec.bytes} (truncated or replaced)"
            elif mode != "size":
                st = p.stat()
                key = str(p.resolve())
                stamp = [st.st_size, st.st_mtime_ns, rec.sha256]
                if mode == "sha256" or stamps.get(key) != stamp:
                    if sha256_file(p) != rec.sha256:
                        row["status"] = "sha256 mismatch (corrupted or replaced)"
                    elif mode == "once":
                        stamps[key] = stamp
                        changed = True
        except OSError as e:  # a file this user may not read
            row["status"] = f"unreadable ({e.strerror or e})"
        rows.append(row)
        if row["status"] != "ok":
            bad.append(f"{name}: {row['status']}")
    if changed:
        _save_stamps(stamps)
    if bad:
        raise BundleError(f"bundle {bundle} is damaged: " + "; ".join(bad) + ". Export it again.")
    return rows
