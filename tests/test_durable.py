"""distbp.durable on real files: replace_durably fsyncs the file, renames it, fsyncs the
directory, in that order; a failure (or a killed process) before the rename leaves the old file
whole; fsync_path works on files and directories and never leaks its descriptor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_py

from distbp.durable import fsync_path, replace_durably


def _open_fds() -> int:
    """How many descriptors this process holds (Linux /proc)."""
    return len(os.listdir("/proc/self/fd"))


def _files(directory: Path) -> dict[str, bytes]:
    """{name: content} of the plain files in `directory`."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_replaced_file_has_the_new_content_and_the_temp_is_gone(tmp_path):
    (tmp_path / "out.h5").write_bytes(b"old")
    (tmp_path / ".out.h5.tmp").write_bytes(b"new contents")
    replace_durably(tmp_path / ".out.h5.tmp", tmp_path / "out.h5")
    assert _files(tmp_path) == {"out.h5": b"new contents"}


def test_replace_creates_the_final_file_when_there_was_none(tmp_path):
    (tmp_path / "t").write_bytes(b"\x00\x01\x02")
    replace_durably(str(tmp_path / "t"), str(tmp_path / "f"))  # str paths work as well
    assert _files(tmp_path) == {"f": b"\x00\x01\x02"}


def test_relative_final_name_fsyncs_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), fsync(fd)))
    Path("t").write_bytes(b"x")
    replace_durably("t", "f")
    assert synced[-1] == os.stat(".").st_ino
    assert _files(tmp_path) == {"f": b"x"}


def test_order_is_fsync_file_then_rename_then_fsync_directory(tmp_path, monkeypatch):
    tmp, final = tmp_path / "t", tmp_path / "f"
    tmp.write_bytes(b"new")
    file_inode, dir_inode = os.stat(tmp).st_ino, os.stat(tmp_path).st_ino
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync",
                        lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd)))
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append(("replace", Path(a), Path(b))), replace(a, b)))
    replace_durably(tmp, final)
    assert events == [("fsync", file_inode), ("replace", tmp, final), ("fsync", dir_inode)]


def test_failed_file_fsync_leaves_the_old_file_and_the_temp_untouched(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"old")
    (tmp_path / "t").write_bytes(b"new")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    before = _open_fds()
    with pytest.raises(OSError, match="Input/output error"):
        replace_durably(tmp_path / "t", tmp_path / "f")
    assert _open_fds() == before  # the descriptor was closed on the way out
    assert _files(tmp_path) == {"f": b"old", "t": b"new"}  # the caller removes the temp


def test_failed_rename_leaves_the_final_path_and_the_temp_untouched(tmp_path):
    (tmp_path / "t").write_bytes(b"new")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "inside").write_bytes(b"keep")  # a non-empty directory cannot be replaced
    with pytest.raises(OSError):
        replace_durably(tmp_path / "t", tmp_path / "f")
    assert _files(tmp_path) == {"t": b"new"}
    assert _files(tmp_path / "f") == {"inside": b"keep"}


def test_fsync_path_syncs_files_and_directories_without_leaking_descriptors(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    before = _open_fds()
    for path in (tmp_path / "a", str(tmp_path / "a"), tmp_path):
        fsync_path(path)
    assert _open_fds() == before
    assert (tmp_path / "a").read_bytes() == b"abc"


def test_fsync_path_of_a_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


KILL_SCRIPT = """
import os, sys
from distbp.durable import replace_durably

directory, point = sys.argv[1], sys.argv[2]
calls = []
fsync, replace = os.fsync, os.replace

def fsync_or_die(fd):
    calls.append("fsync")
    if point == "dir-fsync" and len(calls) == 2:
        os._exit(9)
    fsync(fd)

def replace_or_die(a, b):
    if point == "replace":
        os._exit(9)
    replace(a, b)

if point == "file-fsync":
    os.fsync = lambda fd: os._exit(9)
else:
    os.fsync = fsync_or_die
os.replace = replace_or_die
replace_durably(os.path.join(directory, "t"), os.path.join(directory, "f"))
"""


@pytest.mark.parametrize("point,left", [
    ("file-fsync", {"f": b"old", "t": b"new"}),  # killed before the rename: old file whole
    ("replace", {"f": b"old", "t": b"new"}),
    ("dir-fsync", {"f": b"new"}),                 # killed after it: the new file whole
])
def test_process_killed_at_each_step_leaves_one_whole_final_file(tmp_path, point, left):
    work = tmp_path / "work"
    work.mkdir()
    (work / "f").write_bytes(b"old")
    (work / "t").write_bytes(b"new")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = run_py([str(script), str(work), point], timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert _files(work) == left
