"""Typed errors. Library code raises these; only the CLI turns them into exit codes.

Every message says what is wrong *and* what to do about it.
"""
from __future__ import annotations


class EdgeVLMError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInput(EdgeVLMError):
    """The user handed us something we cannot use (image, prompt, option)."""

    exit_code = 2


class BadImage(BadInput):
    pass


class ContextOverflow(BadInput):
    def __init__(self, needed: int, n_ctx: int):
        self.needed, self.n_ctx = needed, n_ctx
        super().__init__(
            f"the prompt needs {needed} positions (text + image tokens + answer) but the "
            f"context holds {n_ctx}: shorten the prompt, lower --max-tokens, or raise --n-ctx"
        )


class BundleError(EdgeVLMError):
    """A bundle is missing, incomplete, corrupt or of a format we do not read."""

    exit_code = 3


class EmbeddingSizeMismatch(BundleError):
    pass


class SourceError(EdgeVLMError):
    """A source model (checkpoint folder, recipe) cannot be loaded."""

    exit_code = 4


class CheckpointMismatch(SourceError):
    def __init__(self, what: str, missing=(), unexpected=(), hint: str = ""):
        self.missing, self.unexpected = list(missing), list(unexpected)
        parts = [f"{what} does not match the model it should load into"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:8])}"
                         + (" …" if len(self.missing) > 8 else ""))
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:8])}"
                         + (" …" if len(self.unexpected) > 8 else ""))
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


class MissingPackage(EdgeVLMError):
    def __init__(self, package: str, install: str, why: str = ""):
        self.package = package
        super().__init__(f"{why + ': ' if why else ''}the package '{package}' is not installed; "
                         f"install it with: {install}")


class ExportError(EdgeVLMError):
    exit_code = 5


class ExportValidationError(ExportError):
    """An exported artifact disagrees with the torch model it came from."""

    def __init__(self, what: str, max_diff: dict, tolerance: str):
        self.max_diff = max_diff
        diffs = ", ".join(f"{k}: {v:.3g}" for k, v in max_diff.items())
        super().__init__(f"{what} does not match torch within {tolerance} (max |diff| per output: "
                         f"{diffs}); nothing was written. Report this with the command you ran.")


class DeviceUnavailable(EdgeVLMError):
    exit_code = 6
