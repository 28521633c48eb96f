"""Atomic bundle writing: build in a hidden temporary folder next to the target, validate,
write `manifest.json` last, then rename into place. A crash or Ctrl-C leaves no folder that
`inspect` or the runtime would accept (they require the manifest and every listed hash)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_vlm.errors import BadInput
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
        self._recover()
        if self.target.exists():
            if not self.force:
                raise BadInput(f"{self.target} already exists: choose another -o or pass --force to replace it")
            # --force replaces a bundle (or an empty folder), never an arbitrary folder or file
            if not (self.target.is_dir() and ((self.target / MANIFEST).is_file() or not any(self.target.iterdir()))):
                raise BadInput(f"{self.target} exists and is not an edge-vlm bundle: --force only replaces bundles; "
                               "choose another -o")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self

    def _recover(self) -> None:
        """Clean up after exports that were killed: drop their partial folders, and put back a
        bundle that was moved aside for replacement if the new one never arrived."""
        for stale in self.target.parent.glob(f".{self.target.name}.*-*"):
            kind, _, pid = stale.name.rpartition("-")
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind.endswith(".old") and not self.target.exists():
                stale.replace(self.target)
            elif kind.endswith((".partial", ".old")):
                shutil.rmtree(stale, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: Manifest) -> Path:
        manifest.files = {p.relative_to(self.tmp).as_posix(): describe_file(p) for p in sorted(self.tmp.rglob("*"))
                          if p.is_file() and p.relative_to(self.tmp).as_posix() != MANIFEST}
        part = self.tmp / (MANIFEST + ".part")
        part.write_text(manifest.to_json())
        part.replace(self.tmp / MANIFEST)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            self.target.replace(old)
        try:
            self.tmp.replace(self.target)
        except BaseException:
            if old is not None and not self.target.exists():
                old.replace(self.target)  # keep the previous bundle rather than none
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def __exit__(self, exc_type, exc, tb):
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
