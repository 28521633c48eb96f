"""Family adapters: one module per family, each turning a source on disk into a `SourceModel`.

FAMILIES maps the `family` field of a source description to the module that loads it. A source
is described by an `edge-vlm-source.json` in a folder (built-in models, `edge-vlm synth`
output), by a recipe (export/*.toml) or by CLI flags (`--family --vit --qformer --ckpt --llm`).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from edge_vlm.errors import SourceError

UPSTREAM = "edge_vlm.families.minigpt"
FAMILIES = {
    # MiniGPT-4's recipe at nano scale: frozen EfficientNet-Lite0, trained MiniGPT-v2-style
    # concat-4 projection, frozen SmolLM2-135M-Instruct. The built-in default model.
    "nano": "edge_vlm.families.nano",
    # the upstream families from their released files (families.md); the table is minigpt.FAMILIES
    "minigpt4": UPSTREAM,
    "minigpt4-llama2": UPSTREAM,
    "minigpt-v2": UPSTREAM,
    "tinygpt-v": UPSTREAM,
    "tinygpt-v-stage4": UPSTREAM,
    "auto": UPSTREAM,  # detected from the training checkpoint's keys and shapes
}

SOURCE_FILE = "edge-vlm-source.json"
BUILTIN = {"nano": Path(__file__).resolve().parent.parent / "models" / "nano"}
DEFAULT_SOURCE = "nano"
# full unpickling (code execution) is the user's decision on the command line, never a file's
TRUST_FIELD = "trust_checkpoint"


def resolve_source(source: str | None) -> Path:
    """A built-in model name, or a folder holding an `edge-vlm-source.json`."""
    source = source or DEFAULT_SOURCE
    if source in BUILTIN:
        return BUILTIN[source]
    p = Path(source)
    if p.is_file() and p.name == SOURCE_FILE:
        p = p.parent
    if not (p / SOURCE_FILE).is_file():
        raise SourceError(f"{source!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a folder with "
                          f"{SOURCE_FILE}")
    return p


def describe_source(source: str | None = None, overrides: dict | None = None) -> tuple[Path, dict]:
    """(root that relative paths start from, description). `overrides` (recipe fields, CLI flags,
    paths already absolute) replace the description's fields; with a `family` and no `source`
    they are the whole description. Validated here (source_schema): what comes back holds only
    known fields of the right types and ranges, as the file or the flags set them."""
    from edge_vlm.families.source_schema import parse_source

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "family" in overrides and (source is None or (Path(source).is_dir() and not (Path(source) / SOURCE_FILE).exists())):
        # a folder holding upstream files, or the cwd
        desc = parse_source(overrides, "the recipe / command-line source fields", allow_trust=True)
        return Path(source or Path.cwd()).resolve(), desc.model_dump(exclude_unset=True, by_alias=True)
    root = resolve_source(source)
    where = root / SOURCE_FILE
    desc = parse_source(read_json(where, SourceError), str(where))  # refuses trust_checkpoint in the file
    if desc.family == "nano" and "add_bos" in overrides:  # --bos / --no-bos apply to every family
        desc.prompt.add_bos = bool(overrides.pop("add_bos"))
    if overrides and desc.family == "nano":
        raise SourceError(f"--{' --'.join(sorted(overrides))} apply to the upstream families, not to {root} "
                          "(family nano)")
    if overrides:
        merged = {**desc.model_dump(exclude_unset=True, by_alias=True), **overrides}
        desc = parse_source(merged, f"the recipe / command-line fields over {where}", allow_trust=True)
    return root, desc.model_dump(exclude_unset=True, by_alias=True)


def read_json(path: Path, error=SourceError):
    """A JSON file's value; unreadable, not UTF-8, not JSON or absurdly nested -> `error` naming it."""
    from edge_vlm.textfiles import read_structured

    return read_structured(path, error)


def load_source(source: str | None = None, overrides: dict | None = None, defer_llm: bool = False):
    """Load a source model (torch). Returns the family module's `SourceModel`. `defer_llm`: the
    upstream families load the LLM's weights only at `SourceModel.load_llm()` (small models load at once)."""
    root, desc = describe_source(source, overrides)
    family = desc.get("family")
    if family not in FAMILIES:
        raise SourceError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    module = importlib.import_module(FAMILIES[family])
    return module.load(root, desc, defer_llm=True) if defer_llm and FAMILIES[family] == UPSTREAM else \
        module.load(root, desc)
