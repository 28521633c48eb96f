"""Family adapters: one module per family, each turning a source on disk into a `SourceModel`.

FAMILIES maps the `family` field of a source description to the module that loads it.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from edge_vlm.errors import SourceError

FAMILIES = {
    # MiniGPT-4's recipe at nano scale: frozen EfficientNet-Lite0, trained MiniGPT-v2-style
    # concat-4 projection, frozen SmolLM2-135M-Instruct. The built-in default model.
    "nano": "edge_vlm.families.nano",
}

SOURCE_FILE = "edge-vlm-source.json"
BUILTIN = {"nano": Path(__file__).resolve().parent.parent / "models" / "nano"}
DEFAULT_SOURCE = "nano"


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


def load_source(source: str | None = None):
    """Load a source model (torch). Returns family module's `SourceModel`."""
    root = resolve_source(source)
    try:
        desc = json.loads((root / SOURCE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{root / SOURCE_FILE} is not valid JSON: {e}") from e
    family = desc.get("family")
    if family not in FAMILIES:
        raise SourceError(f"unknown family {family!r} in {root / SOURCE_FILE}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family]).load(root, desc)
