"""The files a command names: which ones it may read, which it may write, and who holds a run.

    check_regular(path, "--config 'run.toml'")        # exists, is a regular file: never blocks
    check_not_input(out, [ckpt, data], "--out")       # an output never overwrites an input
    check_private_directory(ckpt_dir, "--checkpoint-dir")   # no planted files from others
    lock = RunLock.acquire(run_dir, "--run-dir")      # one run per directory, until release()

Every path option of every command goes through these, so the rules hold everywhere alike:

- A file distbp reads must be a regular file. A FIFO, socket or device is refused before it is
  opened: opening a FIFO blocks until a writer comes, which may be never, and a device is no
  data. `os.stat` is used for the check because it never blocks.
- An output may not be an input of the same command, compared by resolved path and, where both
  exist, by device and inode (hard links, bind mounts, other spellings).
- A directory distbp writes files into must not be writable by other users unless it has the
  sticky bit: there, anyone could rename or replace the files distbp wrote (a cluster's
  /scratch is world-writable with the sticky bit, and is fine).
- A run holds an exclusive lock (flock) on `.distbp.lock` in its checkpoint directory and in
  its metrics file's directory (by default the run directory) for its lifetime. The file names
  the holder's host and PID, which a second run that is refused prints. The kernel drops the
  lock when the holder exits, however it exits, so a crashed run never leaves a stale lock; a
  run that ends removes the file. On a file system without flock (some Lustre mounts) the lock
  is skipped: `RunLock.acquire` returns a lock that holds nothing and says so in `note`.

Every problem is a UsageError subclass of the caller's choice, one line, naming the option.
This module imports nothing of distbp but errors: every layer may use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from distbp.errors import UsageError, one_line

__all__ = ["LOCK_NAME", "RunLock", "check_not_input", "check_output", "check_private_directory",
           "check_regular", "check_regular_or_absent"]

LOCK_NAME = ".distbp.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, label: str, error: type[UsageError] = UsageError) -> None:
    """`error(f"{label}: ...")` unless `path` (symlinks followed) is an existing regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{label}: not found") from None
    except OSError as e:
        raise error(f"{label}: cannot read: {e.strerror or one_line(e)}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{label}: not a regular file ({_kind(mode)}); give a file") from None


def check_regular_or_absent(path: str | Path, label: str,
                            error: type[UsageError] = UsageError) -> bool:
    """For an output: whether `path` exists; `error` if it exists and is not a regular file (a
    FIFO would block the writer, a device would take the output). A dangling symlink counts as
    existing and is refused: distbp never writes through a symlink it did not make."""
    if not os.path.lexists(path):
        return False
    if os.path.islink(path) and not os.path.exists(path):
        raise error(f"{label}: is a dangling symbolic link; remove it or give another name")
    check_regular(path, label, error)
    return True


def _same(a: str | Path, b: str | Path) -> bool:
    """Whether two names are one file: the same resolved path, or the same device and inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_not_input(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]],
                    label: str, error: type[UsageError] = UsageError) -> None:
    """`error` if `output` is one of `inputs`, (what, path) pairs such as ("--data", "x.h5");
    None paths (an option not given) are skipped."""
    for what, path in inputs:
        if path is not None and _same(output, path):
            raise error(f"{label}: is the {what} '{path}' this command reads; writing it would "
                        "destroy it: give another name")


def check_output(path: str | Path, label: str,
                 inputs: Iterable[tuple[str, str | Path | None]] = (),
                 others: Iterable[tuple[str, str | Path | None]] = (),
                 error: type[UsageError] = UsageError) -> bool:
    """The rules for a file distbp writes (under a temporary name beside it, then renamed onto
    it): `error` if `path` is a directory, a symbolic link (distbp never writes through one), no
    regular file (a FIFO or a device would be replaced by a file), the run lock's name, one of
    the command's `inputs` or of its `others` outputs ((what, path) pairs), or in a directory
    others may write into without the sticky bit. Returns whether `path` exists."""
    path = Path(path)
    if path.name == LOCK_NAME:
        raise error(f"{label}: '{LOCK_NAME}' is the name of distbp's run lock: give another name")
    if os.path.isdir(path):
        raise error(f"{label}: is a directory; give a file name")
    if os.path.islink(path):
        raise error(f"{label}: is a symbolic link; distbp never writes through one: give the "
                    f"file's own name or another")
    exists = check_regular_or_absent(path, label, error)
    check_not_input(path, inputs, label, error)
    for what, other in others:
        if other is not None and _same(path, other):
            raise error(f"{label}: is also the {what} '{other}' of this command: give each "
                        f"output its own name")
    check_private_directory(path.parent, label, error)
    return exists


def check_private_directory(directory: str | Path, label: str,
                            error: type[UsageError] = UsageError) -> None:
    """`error` if the existing `directory` is writable by others without the sticky bit."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return  # absent: made later with the umask's mode, or refused by the caller's probe
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise error(f"{label}: directory '{directory}' is writable by every user (mode "
                    f"{stat.S_IMODE(mode):o}) without the sticky bit: others could replace the "
                    f"files distbp writes there; chmod o-w or +t it, or use another directory")


class RunLock:
    """An exclusive flock on `directory/.distbp.lock`, held until `release()` or process exit.

    `note`: why nothing is held (no flock on that file system), else None."""

    def __init__(self, fd: int | None, path: Path, note: str | None = None):
        self.fd, self.path, self.note = fd, path, note

    @classmethod
    def acquire(cls, directory: str | Path, label: str,
                error: type[UsageError] = UsageError) -> RunLock:
        """Lock the existing `directory`; `error` naming the holder's host and PID if another
        process holds it."""
        path = Path(directory) / LOCK_NAME
        for _ in range(100):  # a holder that ends removes the file: lock the one now there
            lock = cls._try(path, directory, label, error)
            if lock.fd is None or _inode(path) == os.fstat(lock.fd).st_ino:
                return lock
            lock.release()
        raise error(f"{label}: cannot lock '{directory}': its lock file keeps changing")

    @classmethod
    def _try(cls, path: Path, directory: str | Path, label: str,
             error: type[UsageError]) -> RunLock:
        """One attempt: open (or create) `path` and flock it without waiting."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise error(f"{label}: cannot create lock file '{path}': "
                        f"{e.strerror or one_line(e)}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise error(f"{label}: lock file '{path}' is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return cls(None, path, f"{label}: '{directory}' cannot be locked "
                                       f"({e.strerror}); another run there would not be noticed")
            raise error(_in_use(label, directory, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @staticmethod
    def check_free(directory: str | Path, label: str, error: type[UsageError] = UsageError
                   ) -> None:
        """`error` naming the holder if a run holds `directory`'s lock now; creates nothing
        (setup calls it before reading checkpoints that a running run may rotate away)."""
        path = Path(directory) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return  # no lock file (or none that can be opened): nobody holds it
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                raise error(_in_use(label, directory, holder)) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (closing the descriptor). Removing it first
        means a run that opened the old file before finds it gone when it locks it, and tries
        again (`acquire` compares inodes), so two runs never both hold a lock."""
        if self.fd is not None:
            if _inode(self.path) == os.fstat(self.fd).st_ino:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _in_use(label: str, directory: str | Path, holder: str) -> str:
    return (f"{label}: '{directory}' is in use by another run ({holder}); wait for it to end "
            "or give another directory")


def _inode(path: Path) -> int | None:
    """The inode `path` names now (None: it is gone)."""
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
