import os
from pathlib import Path

import numpy as np
import pytest

from tiny_models import smollm2_tokenizer, write_tiny_source

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network


def pytest_configure(config):
    from edge_vlm.logs import quiet_third_party_logs

    quiet_third_party_logs()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path, monkeypatch):
    """No test writes into the user's caches (onnxruntime telemetry, HF caches)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # edge-vlm's verified-hash stamps


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory, tokenizer) -> Path:
    return write_tiny_source(tmp_path_factory.mktemp("src") / "tiny", tokenizer)


@pytest.fixture(scope="session")
def tiny_phi_source(tmp_path_factory, tokenizer) -> Path:
    """A tiny source whose LLM is TinyGPT-V's Phi-2 variant: an architecture llama.cpp cannot express."""
    return write_tiny_source(tmp_path_factory.mktemp("src") / "tiny-phi", tokenizer, llm="tinygpt_v_phi")


@pytest.fixture(scope="session")
def export_backend(tmp_path_factory, tiny_source, tiny_phi_source):
    """Export a tiny source ("llama" or "phi") with a backend at some bits, once per session."""
    from edge_vlm.export.run import ExportConfig, run

    made = {}

    def get(backend: str, bits: int, llm: str = "llama", **options) -> Path:
        key = (backend, bits, llm, tuple(sorted(options.items())))
        if key not in made:
            src = tiny_source if llm == "llama" else tiny_phi_source
            out = tmp_path_factory.mktemp("bundles") / f"tiny-{llm}-{backend}{bits}"
            made[key] = run(ExportConfig(source=str(src), out=str(out), backend=backend, bits=bits, **options),
                            progress=False)
        return made[key]

    return get


@pytest.fixture(scope="session")
def export_tiny(tmp_path_factory, tiny_source):
    """Export the tiny source once per quant type per session."""
    from edge_vlm.export.run import ExportConfig, run

    made = {}

    def get(quant: str) -> Path:
        if quant not in made:
            out = tmp_path_factory.mktemp("bundles") / f"tiny-{quant.lower()}"
            made[quant] = run(ExportConfig(source=str(tiny_source), out=str(out), quant=quant), progress=False)
        return made[quant]

    return get


@pytest.fixture(scope="session")
def shape_image(tmp_path_factory) -> Path:
    from PIL import Image

    x = np.full((64, 64, 3), 255, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    x[(yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2] = (30, 60, 200)
    p = tmp_path_factory.mktemp("img") / "circle.png"
    Image.fromarray(x).save(p)
    return p


@pytest.fixture(scope="session")
def nano_q4(tmp_path_factory) -> Path:
    """The built-in model's default 4-bit bundle (gguf, the 4-bit type its probe picks), exported once per session."""
    from edge_vlm.export.run import ExportConfig, run

    return run(ExportConfig(out=str(tmp_path_factory.mktemp("nano") / "nano-q4"), bits=4), progress=False)
