"""Keeping other libraries' log output out of an edge-vlm user's terminal.

Some dependencies configure the *root* logger when imported (onnxruntime's quantizer calls
`logging.basicConfig(level=INFO)`, GPTQModel's stack does too), after which every INFO line of
every library prints. `root_logging_preserved()` undoes that around such imports."""
from __future__ import annotations

import contextlib
import logging

# loggers whose warnings say nothing an edge-vlm user can act on
NOISY = {
    "torchao": "warns on import about CUDA kernels a CPU build cannot load",
    "torch.utils._pytree": "deprecation notes about torchao's enums",
    "tokenicer": "notes that it set a pad token (GPTQModel)",
    "torch.onnx._internal.exporter._registration": "'torchvision is not installed. Skipping torchvision::nms' (we "
                                                    "export no torchvision op)",
}
# warnings from inside dependencies, about their own internals
NOISY_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),  # torch's pytree, raised while exporting ONNX
)
# set before the libraries are imported (they read them once): transformers' and huggingface_hub's
# progress bars ("Loading weights", "Converting and de-quantizing GGUF tensors") and info lines
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_third_party_logs() -> None:
    """Our progress and results only. EDGE_VLM_VERBOSE=1 (or `edge-vlm --verbose`) keeps everything."""
    import os
    import warnings

    if os.environ.get("EDGE_VLM_VERBOSE"):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def root_logging_preserved():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextlib.contextmanager
def no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"),
    which no environment variable turns off; ours already says what stage an export is in."""
    import os

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or os.environ.get("EDGE_VLM_VERBOSE"):
        yield
        return
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        gguf_utils.tqdm = original
