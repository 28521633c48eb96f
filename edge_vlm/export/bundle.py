"""Atomic bundle writing: build in a hidden temporary folder next to the target, validate,
write `manifest.json` last, then rename into place. A crash or Ctrl-C leaves no folder that
`inspect` or the runtime would accept (they require the manifest and every listed hash).

Names used next to the target `NAME` (all hidden, all ending in the writer's pid):
  .NAME.partial-PID  the bundle being built (holds WRITER_MARK while it is being built)
  .NAME.old-PID      the previous bundle, parked during a --force replace
A later export into the same folder removes partial folders of dead writers, and any command that
touches NAME (`restore_parked`) puts back a parked bundle whose replacement never arrived.

This module imports no torch (only the standard library, edge_vlm.errors and edge_vlm.manifest):
`load_manifest` calls `restore_parked` before reading a bundle.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from edge_vlm.errors import BadInput, ExportError
from edge_vlm.manifest import MANIFEST, Manifest, describe_file

WRITER_MARK = ".edge-vlm-writer"  # "PID START_TIME": tells a dead writer from a live process that reused its pid
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[0-9]+)$")
_PID_MAX = 1 << 22  # Linux's hard limit; larger numbers are not pids we wrote (and os.kill would overflow)
_ACTIVE: set[str] = set()  # partial folders this process is building now (its own pid is alive, they are not stale)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and parens
    return fields[19] if len(fields) > 19 else None  # fields[0] is field 3


def _writer_alive(partial: Path, pid: int) -> bool:
    """Is the writer that named its folders with `pid` (building `partial`) still running? The
    marker's start time guards against a reused pid; without a marker (killed before writing it, or a
    parked bundle whose partial folder is gone) the pid alone decides."""
    if str(partial) in _ACTIVE:
        return True
    if pid == os.getpid():
        return False  # our own pid, but not a folder this process is building: a dead writer had this pid
    if not _pid_alive(pid):
        return False
    try:
        mark_pid, started = (partial / WRITER_MARK).read_text().split()
    except (OSError, ValueError):
        return True
    if mark_pid != str(pid) or started == "-":
        return True
    now = _start_time(pid)
    return now is None or now == started


def _looks_parked(path: Path) -> bool:
    """A parked folder is always a bundle or the empty folder --force replaced: never move or delete
    a user's own `.config.old-1234` backup."""
    try:
        return (path / MANIFEST).is_file() or not any(path.iterdir())
    except OSError:
        return False


def _looks_partial(path: Path) -> bool:
    """A partial folder holds our writer mark, a manifest (between the last two renames) or nothing:
    never delete a user's own `.data.partial-1234` folder."""
    try:
        return (path / WRITER_MARK).is_file() or (path / MANIFEST).is_file() or not any(path.iterdir())
    except OSError:
        return False


def _leftovers(parent: Path):
    """(path, NAME, kind) for each hidden folder in `parent` left by a dead writer."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        m = _LEFTOVER.match(e.name)
        try:
            if not m or not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        pid, path = int(m["pid"]), Path(e.path)
        looks_ours = _looks_parked(path) if m["kind"] == "old" else _looks_partial(path)
        if not 0 < pid <= _PID_MAX or not looks_ours:
            continue
        if not _writer_alive(parent / f".{m['name']}.partial-{pid}", pid):
            yield path, m["name"], m["kind"]


def restore_parked(bundle_path) -> bool:
    """Put back `.NAME.old-PID` (a bundle parked by a --force export that died before its new bundle
    arrived) when `bundle_path` (NAME) is missing. Returns True if it restored one. Never raises for
    file-system trouble: the caller goes on to report a missing bundle as usual."""
    try:
        target = Path(bundle_path).resolve()
        if os.path.lexists(target) or not target.name:
            return False  # the common case costs one stat
        # only while its writer's new bundle is still unpublished (its partial folder is there): once that
        # was renamed into place the parked one is stale, even if the user has since deleted the bundle
        parked = [p for p, name, kind in _leftovers(target.parent) if kind == "old" and name == target.name
                  and _partial_of(p).is_dir()]
        if not parked:
            return False
        newest = max(parked, key=lambda p: p.stat().st_ctime)  # several dead --force runs: the last one parked
        newest.rename(target)
        _fsync_dir(target.parent)
        return True
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Path.resolve on Python 3.11)
        return False


def _partial_of(parked: Path) -> Path:
    """`.NAME.partial-PID` of the writer that parked `.NAME.old-PID`."""
    m = _LEFTOVER.match(parked.name)
    return parked.parent / f".{m['name']}.partial-{m['pid']}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync flushes what was written through any descriptor: no re-read
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable. Some file systems cannot fsync a folder: that
    only costs durability there, not correctness."""
    try:
        _fsync_file(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR):
            raise


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


class BundleWriter:
    def __init__(self, target: Path, force: bool = False):
        try:
            self.target = Path(target).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise BadInput(f"-o {target}: {getattr(e, 'strerror', None) or e}: choose another -o") from e
        self.force = force
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"

    def check(self) -> "BundleWriter":
        """Fail fast, before any heavy work, when the bundle could not be written: -o under a file, a
        folder we may not write into, a name too long, a target that is a file or a folder that --force
        may not replace. Also cleans up after killed exports in the target's folder. Cheap and
        repeatable; __enter__ calls it again."""
        t = self.target
        try:
            if not t.name:
                raise BadInput(f"-o {t} names no folder: give a new folder's path, e.g. -o {t / 'bundle'}")
            # the nearest ancestor that exists is where folders get created: it must be a writable folder
            base = t.parent
            while not base.exists() and base != base.parent:
                base = base.parent
            if not base.is_dir():
                raise BadInput(f"-o {t}: {base} is a file, not a folder: choose an -o whose parent is a folder")
            if not os.access(base, os.W_OK | os.X_OK):  # EROFS too; root passes, so __enter__ also catches errors
                raise BadInput(f"-o {t}: cannot write into {base} (no permission, or a read-only file system): "
                               "choose an -o in a folder you can write to")
            # the longest name we create is the hidden `.NAME.partial-PID`
            if len(os.fsencode(self.tmp.name)) > _name_max(base) or len(os.fsencode(str(self.tmp))) >= 4096:  # PATH_MAX
                raise BadInput(f"-o {t}: the name is too long for the file system (at most {_name_max(base)} "
                               f"bytes per folder name, including the hidden '.NAME.partial-PID' used while "
                               "writing): choose a shorter -o")
            self._recover()
            if t.exists() and not t.is_dir():
                raise BadInput(f"-o {t} is an existing file, not a bundle folder: choose another -o")
            if t.exists():
                if not self.force:
                    raise BadInput(f"{t} already exists: choose another -o or pass --force to replace it")
                # --force replaces a bundle (or an empty folder), never an arbitrary folder or file
                if not ((t / MANIFEST).is_file() or not any(t.iterdir())):
                    raise BadInput(f"{t} exists and is not an edge-vlm bundle: --force only replaces bundles; "
                                   "choose another -o")
        except OSError as e:
            raise _as_user_error(e, t) from e
        return self

    def __enter__(self) -> "BundleWriter":
        self.check()
        if str(self.tmp) in _ACTIVE:
            raise BadInput(f"another export to {self.target} is running in this process")
        _ACTIVE.add(str(self.tmp))  # before mkdir: from now on no cleanup takes it for a dead writer's
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
            (self.tmp / WRITER_MARK).write_text(f"{os.getpid()} {_start_time(os.getpid()) or '-'}\n")
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):  # lost a race with check(), or a file system that lied to os.access
                raise _as_user_error(e, self.target) from e
            raise
        return self

    def _recover(self) -> None:
        """Clean up after exports into this folder that were killed (any bundle name, not only ours):
        drop their partial folders, and put back a bundle moved aside for replacement if the new one
        never arrived (or drop it if the new one did)."""
        parent = self.target.parent
        found = list(_leftovers(parent))
        for path, name, kind in found:  # parked bundles first: restore before their partials go
            if kind == "old":
                if not os.path.lexists(parent / name):
                    restore_parked(parent / name)  # puts back the newest parked one whose new bundle never came
                if path.exists() and (os.path.lexists(parent / name) or not _partial_of(path).is_dir()):
                    shutil.rmtree(path, ignore_errors=True)  # a bundle is in place, or its replacement was published
        for path, _, kind in found:
            if kind == "partial":
                shutil.rmtree(path, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, manifest: Manifest) -> Path:
        files = sorted(p for p in self.tmp.rglob("*") if p.is_file()
                       and p.relative_to(self.tmp).as_posix() not in (MANIFEST, MANIFEST + ".part", WRITER_MARK))
        manifest.files = {p.relative_to(self.tmp).as_posix(): describe_file(p) for p in files}
        # Durability: every byte on disk before the manifest that vouches for it, and the manifest and
        # the folder entries before the rename that publishes them; else a power cut can leave a
        # bundle whose valid manifest lists empty or truncated files.
        for p in files:
            _fsync_file(p)
        part = self.tmp / (MANIFEST + ".part")
        with open(part, "w") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        part.replace(self.tmp / MANIFEST)
        if not self.force and os.path.lexists(self.target):
            raise BadInput(f"{self.target} appeared while exporting: choose another -o or pass --force")
        (self.tmp / WRITER_MARK).unlink(missing_ok=True)  # not part of the bundle
        for d in [d for d in self.tmp.rglob("*") if d.is_dir()] + [self.tmp]:
            _fsync_dir(d)
        old = None
        try:
            if os.path.lexists(self.target):
                old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
                self.target.replace(old)  # parked; if we die now, restore_parked puts it back
            self.tmp.replace(self.target)
        except BaseException:
            # interrupted (Ctrl-C) or failed between the two renames: keep the previous bundle rather than none
            if old is not None and old.exists() and not os.path.lexists(self.target):
                old.replace(self.target)
            raise
        _fsync_dir(self.target.parent)
        if old is not None:
            # delete it under our partial name (free again, still ours): if killed half-way, what is left
            # is a dead writer's partial folder, which the next export removes, never a half bundle
            try:
                old.replace(self.tmp)
            except OSError:
                shutil.rmtree(old, ignore_errors=True)
            self._discard()
        return self.target

    def _discard(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        _ACTIVE.discard(str(self.tmp))

    def __exit__(self, exc_type, exc, tb):
        self._discard()
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise ExportError(f"the disk holding {self.target.parent} is full ({exc.strerror}) while writing the "
                              "bundle; nothing was written (an existing bundle there is unchanged). Free space, "
                              "or choose an -o on another disk, and export again") from exc
        return False


def _as_user_error(e: OSError, target: Path) -> BadInput | ExportError:
    """An OSError from creating the bundle's folders as a message that says what to do."""
    if e.errno in _DISK_FULL:
        return ExportError(f"-o {target}: the disk is full ({e.strerror}): free space or choose another -o")
    why = {errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
           errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EEXIST: "a part of the path is a file, not a folder",
           errno.ENAMETOOLONG: "the name is too long for the file system"}.get(e.errno, e.strerror or str(e))
    return BadInput(f"-o {target}: cannot create the bundle folder ({why}): choose another -o")
