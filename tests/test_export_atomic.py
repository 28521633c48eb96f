"""Interrupted exports: a killed or failed export leaves the old bundle or the new one, never neither and
never a half bundle; its leftovers are cleaned by the next export into the same folder; -o problems are
clear errors, found before any heavy work. No model is exported: BundleWriter is driven directly."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_vlm.errors import BadInput, BundleError, ExportError
from edge_vlm.export import bundle
from edge_vlm.export.bundle import WRITER_MARK, BundleWriter, restore_parked
from edge_vlm.manifest import LLMSpec, Manifest, Preprocess, PromptSpec, VisionSpec, load_manifest, verify_files


def small_manifest(tag: str = "v1") -> Manifest:
    """The least a manifest holds; `tag` (in edge_vlm_version) tells bundles apart."""
    return Manifest(family="test", source={}, preprocess=Preprocess(image_size=8, mean=[0.5] * 3, std=[0.5] * 3),
                    vision=VisionSpec(file="vision.onnx", input_name="pixels", output_name="embeds",
                                      n_image_tokens=1, n_embd=4),
                    llm=LLMSpec(backend="gguf", file="llm.gguf", arch="llama", n_embd=4, n_ctx_train=64),
                    prompt=PromptSpec(template="<ImageHere>{prompt}"), edge_vlm_version=tag)


def write_bundle(target: Path, tag: str = "v1", force: bool = False) -> Path:
    with BundleWriter(target, force) as bw:
        bw.path("vision.onnx").write_bytes(b"vision " + tag.encode())
        bw.path("llm.gguf").write_bytes(b"llm " + tag.encode())
        return bw.commit(small_manifest(tag))


def tag_of(b: Path) -> str:
    m = load_manifest(b)
    verify_files(b, m)
    return m.edge_vlm_version


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()
    p.wait()


def test_commit_makes_a_complete_bundle_and_nothing_else(tmp_path):
    b = write_bundle(tmp_path / "b")
    assert tag_of(b) == "v1" and sorted(load_manifest(b).files) == ["llm.gguf", "vision.onnx"]
    assert not (b / WRITER_MARK).exists() and os.listdir(tmp_path) == ["b"]
    assert tag_of(write_bundle(b, "v2", force=True)) == "v2" and os.listdir(tmp_path) == ["b"]


def test_commit_fsyncs_files_manifest_and_folders_before_publishing(tmp_path, monkeypatch):
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    with BundleWriter(tmp_path / "b") as bw:
        (bw.path("ckpt")).mkdir()
        for name in ("vision.onnx", "llm.gguf", "ckpt/part1"):
            bw.path(name).write_bytes(b"x")
        partial = str(bw.tmp)
        bw.commit(small_manifest())
    names = [s.replace(partial, "PARTIAL") for s in synced]
    assert set(names[:3]) == {"PARTIAL/vision.onnx", "PARTIAL/llm.gguf", "PARTIAL/ckpt/part1"}
    assert names[3:] == ["PARTIAL/manifest.json.part", "PARTIAL/ckpt", "PARTIAL", str(tmp_path)]


def test_dead_writers_partial_of_any_name_is_removed(tmp_path, dead_pid):
    for name in ("b", "other", "x.y"):
        stale = tmp_path / f".{name}.partial-{dead_pid}"
        stale.mkdir()
        (stale / "vision.onnx").write_bytes(b"half")
        (stale / WRITER_MARK).write_text(f"{dead_pid} -\n")
    users = tmp_path / f".data.partial-{dead_pid}"  # looks like ours, holds a user's file: kept
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    write_bundle(tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == sorted(["b", users.name])


def test_live_writers_partial_is_kept_unless_its_pid_was_reused(tmp_path, live_pid):
    plain, marked, reused = (tmp_path / f".{n}.partial-{live_pid}" for n in ("plain", "marked", "reused"))
    for p in (plain, marked, reused):
        p.mkdir()
    (marked / WRITER_MARK).write_text(f"{live_pid} {bundle._start_time(live_pid)}\n")
    (reused / WRITER_MARK).write_text(f"{live_pid} 1\n")  # the pid's owner started at another time
    BundleWriter(tmp_path / "b").check()
    assert plain.exists() and marked.exists() and not reused.exists()


def test_own_pid_leftover_from_an_earlier_process_is_removed(tmp_path):
    (tmp_path / f".b.partial-{os.getpid()}").mkdir()  # a dead process had our pid
    write_bundle(tmp_path / "b")
    assert os.listdir(tmp_path) == ["b"]


def test_only_our_own_leftover_names_are_touched(tmp_path, dead_pid):
    keep = [f".other.partial-{dead_pid}x", f"other.partial-{dead_pid}", ".other.partial-0",
            f".other.partial-{1 << 40}", f".cfg.old-{dead_pid}"]
    for name in keep:
        (tmp_path / name).mkdir()
    (tmp_path / f".cfg.old-{dead_pid}" / "settings").write_text("a user's own backup, not a parked bundle")
    (tmp_path / f".notes.partial-{dead_pid}").write_text("a file, not our folder")
    write_bundle(tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["b", f".notes.partial-{dead_pid}"])
    assert not (tmp_path / "cfg").exists()


def park(b: Path, pid: int) -> Path:
    """What a --force export killed between its two renames leaves: the old bundle parked, and the
    new one, complete but unpublished, in its partial folder."""
    parked = b.parent / f".{b.name}.old-{pid}"
    b.rename(parked)
    shutil.copytree(parked, b.parent / f".{b.name}.partial-{pid}")
    return parked


def test_restore_parked_puts_back_a_dead_writers_bundle(tmp_path, dead_pid):
    b = write_bundle(tmp_path / "b")
    park(b, dead_pid)
    assert restore_parked(b) is True and tag_of(b) == "v1" and sorted(os.listdir(tmp_path)) == [
        f".b.partial-{dead_pid}", "b"]  # the unpublished one goes with the next export
    assert restore_parked(b) is False  # nothing to do: one stat
    assert restore_parked(tmp_path / "nothing" / "here") is False


def test_a_parked_bundle_whose_replacement_was_published_is_not_restored(tmp_path, dead_pid):
    """Killed after publishing the new bundle, before dropping the old: if the user then deletes the
    bundle, the stale old one must not come back; the next export drops it."""
    b = write_bundle(tmp_path / "b")
    parked = park(b, dead_pid)
    shutil.rmtree(tmp_path / f".b.partial-{dead_pid}")  # published (renamed into place), then deleted by the user
    assert restore_parked(b) is False and not b.exists()
    write_bundle(tmp_path / "c")
    assert not parked.exists() and os.listdir(tmp_path) == ["c"]


def test_any_command_reading_the_bundle_puts_back_a_parked_one(tmp_path, dead_pid):
    b = write_bundle(tmp_path / "b")
    park(b, dead_pid)
    assert tag_of(b) == "v1" and "b" in os.listdir(tmp_path)  # load_manifest calls restore_parked


def test_restore_parked_leaves_a_live_writers_bundle(tmp_path, live_pid):
    b = write_bundle(tmp_path / "b")
    parked = park(b, live_pid)  # that export is between its renames right now
    assert restore_parked(b) is False and parked.exists() and not b.exists()


def test_next_export_into_the_folder_restores_a_parked_bundle(tmp_path, dead_pid):
    b = write_bundle(tmp_path / "b")
    park(b, dead_pid)  # with the new bundle that never arrived
    write_bundle(tmp_path / "c")
    assert tag_of(b) == "v1" and sorted(os.listdir(tmp_path)) == ["b", "c"]
    with pytest.raises(BadInput, match="already exists"):  # the restored bundle is protected again
        BundleWriter(b).check()


def test_parked_bundle_is_dropped_once_a_newer_one_is_in_place(tmp_path, dead_pid):
    new = write_bundle(tmp_path / "new", "v2")
    b = write_bundle(tmp_path / "b")
    park(b, dead_pid)
    shutil.rmtree(tmp_path / f".b.partial-{dead_pid}")
    new.rename(b)  # as a --force export killed after publishing its bundle leaves it
    assert restore_parked(b) is False
    assert hidden(tmp_path) == [f".b.old-{dead_pid}"]  # another name's export cleans it too
    write_bundle(tmp_path / "c")
    assert tag_of(b) == "v2" and sorted(os.listdir(tmp_path)) == ["b", "c"]


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_export_atomic import small_manifest
    from edge_vlm.export import bundle

    where, target, force = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"

    def stop():
        print("ready", flush=True)
        time.sleep(60)

    if where == "files":  # fsyncing the data files: no manifest yet
        bundle._fsync_file = lambda p: stop()
    real_replace = Path.replace
    def replace(self, dst):
        out = real_replace(self, dst)
        if where == "parked" and ".old-" in Path(dst).name:  # old bundle moved aside, new one not yet in place
            stop()
        if where == "published" and Path(dst) == target.resolve():  # new bundle in place, old one not yet deleted
            stop()
        return out
    Path.replace = replace
    with bundle.BundleWriter(target, force) as bw:
        bw.path("vision.onnx").write_bytes(b"vision v2")
        bw.path("llm.gguf").write_bytes(b"llm v2")
        bw.commit(small_manifest("v2"))
    print("finished", flush=True)
""")


def kill_during_commit(target: Path, where: str, force: bool) -> None:
    code = CHILD.format(tests=str(Path(__file__).parent))
    child = subprocess.Popen([sys.executable, "-c", code, where, str(target), "1" if force else "0"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("where,force,expect", [
    ("files", False, None),  # a first export killed: no bundle at all, nothing loadable
    ("files", True, "v1"),  # a replacement killed before its renames: the old bundle untouched
    ("parked", True, "v1"),  # killed between the renames: the old bundle comes back
    ("published", True, "v2"),  # killed after the rename: the new bundle, the old one's leftovers dropped
])
def test_sigkill_during_commit_leaves_old_or_new_bundle(tmp_path, where, force, expect):
    b = tmp_path / "b"
    if force:
        write_bundle(b, "v1")
    kill_during_commit(b, where, force)
    if where == "files":  # killed before the manifest: what it left is not a bundle
        [leftover] = tmp_path.glob(".b.partial-*")
        with pytest.raises(BundleError, match="no manifest.json"):
            load_manifest(leftover)
    restore_parked(b)  # what load_manifest does first
    if expect is None:
        assert not b.exists()
    else:
        assert tag_of(b) == expect
    write_bundle(tmp_path / "c")  # the next export into the folder removes the rest
    assert sorted(os.listdir(tmp_path)) == (["c"] if expect is None else ["b", "c"])


def test_interrupt_between_the_renames_keeps_the_old_bundle(tmp_path, monkeypatch):
    b = write_bundle(tmp_path / "b")
    real, hits = Path.replace, []

    def replace(self, dst):  # Ctrl-C once, as the new bundle is about to take the old one's place
        if Path(dst) == b and not hits:
            hits.append(self)
            raise KeyboardInterrupt
        return real(self, dst)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(b, "v2", force=True)
    monkeypatch.undo()
    assert hits and tag_of(b) == "v1" and os.listdir(tmp_path) == ["b"]


def test_disk_full_during_commit_is_an_export_error_and_keeps_the_old_bundle(tmp_path, monkeypatch):
    b = write_bundle(tmp_path / "b")

    def full(p):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))

    monkeypatch.setattr(bundle, "_fsync_file", full)
    with pytest.raises(ExportError, match="disk .* is full.*Free space") as e:
        write_bundle(b, "v2", force=True)
    assert e.value.exit_code == 5
    monkeypatch.undo()
    assert tag_of(b) == "v1" and os.listdir(tmp_path) == ["b"]


def test_o_under_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    for target in (f / "b", f / "deeper" / "b"):
        with pytest.raises(BadInput, match="notes.txt is a file, not a folder"):
            BundleWriter(target).check()
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("force", [False, True])
def test_target_is_a_file(tmp_path, force):
    f = tmp_path / "b"
    f.write_text("x")
    with pytest.raises(BadInput, match="is an existing file, not a bundle folder"):
        BundleWriter(f, force).check()
    assert f.read_text() == "x"


def test_folder_not_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # tests run as root: chmod would not stop us
    with pytest.raises(BadInput, match="cannot write into .*read-only.*choose an -o"):
        BundleWriter(tmp_path / "new" / "b").check()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_permission_error_when_creating_folders(tmp_path, monkeypatch, err):
    """What os.access did not foresee (root, ACLs, network file systems) is still a clear error."""
    def refuse(self, *a, **k):
        raise PermissionError(err, os.strerror(err), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(BadInput, match="cannot create the bundle folder .*choose another -o"):
        with BundleWriter(tmp_path / "b"):
            pass
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [] and not bundle._ACTIVE


@pytest.mark.parametrize("length", [250, 300])
def test_name_too_long(tmp_path, length):
    """250 bytes fit one folder name, not the hidden `.NAME.partial-PID` next to it."""
    with pytest.raises(BadInput, match="too long .*choose a shorter -o"):
        BundleWriter(tmp_path / ("a" * length)).check()


def test_check_is_cheap_and_repeatable(tmp_path):
    w = BundleWriter(tmp_path / "x" / "y" / "b")
    assert w.check() is w and w.check() is w and os.listdir(tmp_path) == []
    with w:
        pass
    assert os.listdir(tmp_path / "x" / "y") == []


def test_failure_inside_the_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b") as bw:
            bw.path("vision.onnx").write_bytes(b"x")
            raise RuntimeError("validation failed")
    assert os.listdir(tmp_path) == [] and not bundle._ACTIVE


def test_restore_parked_needs_no_torch(tmp_path):
    code = ("import sys; from edge_vlm.export.bundle import restore_parked; "
            f"assert restore_parked({str(tmp_path / 'b')!r}) is False; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_export_under_a_file_is_exit_2_with_the_reason(tiny_source, tmp_path, capsys):
    from edge_vlm.cli import main

    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert main(["export", str(tiny_source), "--bits", "8", "-o", str(f / "b")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt is a file, not a folder" in err and "Traceback" not in err
