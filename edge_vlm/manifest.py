"""The bundle contract: `manifest.json` plus the files it lists (with size and sha256).

This is the only thing the runtime knows about a model. It imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vlm.errors import BundleError

FORMAT = "edge-vlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


@dataclass
class Preprocess:
    """How an image becomes the vision model's input (applied by runtime/preprocess.py)."""

    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = "bicubic"  # direct resize to a square, no crop (as MiniGPT-4's processors)
    color: str = "RGB"


@dataclass
class VisionSpec:
    file: str
    input_name: str
    output_name: str
    n_image_tokens: int
    n_embd: int
    precision: str = "fp32"
    shape: dict = field(default_factory=dict)  # params, seq, width, mlp, heads: what `edge-vlm plan` needs


@dataclass
class LLMSpec:
    backend: str  # a key of edge_vlm.backends.BACKENDS: gguf | onnx | gptq | bnb
    file: str  # a file (gguf, onnx) or a folder of files (gptq, bnb checkpoints) inside the bundle
    arch: str  # the HF model_type of the source LLM
    n_embd: int
    n_ctx_train: int
    quant: dict = field(default_factory=dict)  # bits, method, group size, calibration, real type mix, bits/weight
    tokenizer: dict = field(default_factory=dict)  # backends without their own tokenizer: file, bos/eog ids
    shape: dict = field(default_factory=dict)  # hidden, layers, heads, kv_heads, ff, vocab, tied (plan's KV cache)


@dataclass
class PromptSpec:
    """`template` holds `{prompt}` for the user text and `image_marker` where image embeddings go."""

    template: str
    image_marker: str = "<ImageHere>"
    add_bos: bool = False
    stop: list[str] = field(default_factory=list)

    def render(self, prompt: str) -> tuple[str, str]:
        """Text before and after the image embeddings, user prompt filled in."""
        text = self.template.replace("{prompt}", prompt)
        before, sep, after = text.partition(self.image_marker)
        if not sep:
            raise BundleError(f"prompt template has no image marker {self.image_marker!r}")
        return before, after


@dataclass
class Manifest:
    family: str
    source: dict
    preprocess: Preprocess
    vision: VisionSpec
    llm: LLMSpec
    prompt: PromptSpec
    edge_vlm_version: str
    validation: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> {"bytes": int, "sha256": str}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError("manifest.json does not hold a JSON object: export the bundle again")
        if d.get("format") != FORMAT:
            raise BundleError(f"not an edge-vlm bundle manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {d.get('format_version')} is not readable by this "
                              f"edge-vlm (reads {FORMAT_VERSION}): re-export it with this version")
        try:
            files = d["files"]
            if not isinstance(files, dict) or not all(
                    isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
                    for r in files.values()):
                raise TypeError("'files' must map names to {bytes, sha256}")
            pre = Preprocess(**d["preprocess"])
            if pre.resize not in RESIZE_METHODS:
                raise TypeError(f"unknown resize method {pre.resize!r}")
            return cls(
                family=d["family"], source=d["source"], preprocess=pre,
                vision=VisionSpec(**d["vision"]), llm=LLMSpec(**d["llm"]), prompt=PromptSpec(**d["prompt"]),
                edge_vlm_version=d["edge_vlm_version"], validation=d.get("validation", {}),
                files=files, format=d["format"], format_version=d["format_version"],
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest.json is incomplete or malformed ({e}): re-export the bundle") from e


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_manifest(bundle: Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle folder: create one with `edge-vlm export -o {bundle}`")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}: it is not a finished bundle "
                          "(an interrupted export leaves none); export it again")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}): export the bundle again") from e
    return Manifest.from_dict(data)


VERIFY_MODES = ("once", "sha256", "size")


def _inside(name) -> bool:
    """A plain relative path that stays inside the bundle folder."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(p not in ("", ".", "..") for p in name.split("/"))


def _stamp_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-vlm" / "verified.json"


def _load_stamps() -> dict:
    try:
        return json.loads(_stamp_file().read_text())
    except (OSError, ValueError):
        return {}


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
    used = [manifest.vision.file, manifest.llm.file] + [
        manifest.llm.tokenizer[k] for k in ("file", "embed_tokens") if k in manifest.llm.tokenizer]
    for name in list(manifest.files) + used:
        if not _inside(name):
            raise BundleError(f"manifest names {name!r}: bundle files must be relative paths inside the bundle folder")
    for needed in used:
        if needed not in manifest.files and not any(n.startswith(needed + "/") for n in manifest.files):
            bad.append(f"{needed}: used by the manifest but not listed in its files")
    folder = Path(bundle) / manifest.llm.file
    if folder.is_dir():  # a checkpoint folder: a file in it that the manifest does not list would be loaded unchecked
        extra = sorted(p.relative_to(bundle).as_posix() for p in folder.rglob("*") if p.is_file()
                       and p.relative_to(bundle).as_posix() not in manifest.files)
        if extra:
            bad.append(f"{manifest.llm.file}/ holds files the manifest does not list: {', '.join(extra[:5])}")
    for name, rec in manifest.files.items():
        p = Path(bundle) / name
        row = {"file": name, "bytes": rec["bytes"], "sha256": rec["sha256"], "status": "ok"}
        if not p.is_file():
            row["status"] = "missing"
        elif p.stat().st_size != rec["bytes"]:
            row["status"] = f"size {p.stat().st_size} != {rec['bytes']} (truncated or replaced)"
        elif mode != "size":
            st = p.stat()
            key = str(p.resolve())
            stamp = [st.st_size, st.st_mtime_ns, rec["sha256"]]
            if mode == "sha256" or stamps.get(key) != stamp:
                if sha256_file(p) != rec["sha256"]:
                    row["status"] = "sha256 mismatch (corrupted or replaced)"
                elif mode == "once":
                    stamps[key] = stamp
                    changed = True
        rows.append(row)
        if row["status"] != "ok":
            bad.append(f"{name}: {row['status']}")
    if changed:
        _save_stamps(stamps)
    if bad:
        raise BundleError(f"bundle {bundle} is damaged: " + "; ".join(bad) + ". Export it again.")
    return rows
