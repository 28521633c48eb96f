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
}


def quiet_third_party_logs() -> None:
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def root_logging_preserved():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
