"""Durable files: the fsync and rename steps that make a finished file survive a crash.

Checkpoints, prediction files, plots and imported data files are all written the same way: under
a temporary name in the final file's directory, then fsync the temporary file, os.replace it onto
the final name, fsync the directory.
A crash before the rename leaves the old final file (or none) untouched; a crash after it leaves
the new one complete; the directory fsync makes the rename itself survive a power loss.

These steps live here, once, so every writer orders them the same way. The module only moves
finished files: creating the temporary file, its naming (each caller's cleanup pattern depends
on it) and turning OSError into the caller's one-line error stay with the callers.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path", "replace_durably", "umask"]


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory (which makes the renames and unlinks in it durable).

    Raises OSError as os.open / os.fsync do; the descriptor is closed either way."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, final: str | Path) -> None:
    """Make the closed file `tmp` durable, rename it onto `final`, then make the rename durable.

    In this order: fsync(tmp), os.replace(tmp, final), fsync(final's directory). `tmp` must be in
    final's directory (one file system, so the rename is atomic). On an OSError before the rename
    `final` is untouched and `tmp` remains: the caller removes it (after the rename there is no
    `tmp` left to remove)."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


def umask() -> int:
    """The process's umask, for giving a file made private by mkstemp/mkdtemp the mode any new
    file would have (reading the umask means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
