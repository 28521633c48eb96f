"""Atomic bundle writing: build in a hidden temporary folder next to the target, validate,
write `manifest.json` last, then rename into place. A crash or Ctrl-C leaves no folder that
`inspect` or the runtime would accept (they require the manifest and every listed hash)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_vlm.errors import ExportError
from edge_vlm.manifest import MANIFEST, Manifest, describe_file


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BundleWriter:
    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).resolve()
        self.force = force
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"

    def __enter__(self) -> "BundleWriter":
        if self.target.exists() and not self.force:
            raise ExportError(f"{self.target} already exists: choose another -o or pass --force to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
        self.tmp.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: Manifest) -> Path:
        manifest.files = {p.name: describe_file(p) for p in sorted(self.tmp.iterdir())
                          if p.is_file() and p.name != MANIFEST}
        part = self.tmp / (MANIFEST + ".part")
        part.write_text(manifest.to_json())
        part.replace(self.tmp / MANIFEST)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            self.target.replace(old)
        self.tmp.replace(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def __exit__(self, exc_type, exc, tb):
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
