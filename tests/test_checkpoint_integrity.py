"""Checkpoint integrity: the whole-file SHA-256 header, corruption detection (truncation,
flipped bytes, deleted datasets, edits behind a recomputed hash; fuzzed: never a crash, hang or
wrong value), what latest_valid skips, and load's format checks.

Shared helpers: tests/helpers/ckptstate.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env
from helpers.ckptstate import run_state

from distbp import checkpoint as ck
from distbp import ckpt_integrity
from distbp.errors import CheckpointError


def flip_byte(path: Path, dataset: str, index: int = 0) -> None:
    """Invert one byte of `dataset`'s raw data in the file (a bit rot / torn write)."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        byte = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: Path, fraction: float) -> None:
    os.truncate(path, int(path.stat().st_size * fraction))


def reseal(path: Path) -> None:
    """Rewrite the userblock header as the documented format says, after an edit of the HDF5
    part: what a foreign tool that knows the format would do. Lets a test reach the checks
    behind the whole-file hash (per-dataset SHA-256, structure, attributes)."""
    data = path.read_bytes()
    assert data[532:536] == bytes(4)  # superblock consistency flags: no one holds the file open
    line = (f"distbp-checkpoint sha256 {hashlib.sha256(data[512:]).hexdigest()} "
            f"size {len(data)}\n").encode()
    path.write_bytes(line + b"\0" * (512 - len(line)) + data[512:])


# ------------------------------------------------------------------------------- corruption

CORRUPTIONS = {
    "truncated to 0 bytes": lambda p: truncate(p, 0.0),
    "truncated to 300 bytes": lambda p: os.truncate(p, 300),
    "truncated to 10%": lambda p: truncate(p, 0.1),
    "truncated to 50%": lambda p: truncate(p, 0.5),
    "truncated to 90%": lambda p: truncate(p, 0.9),
    "truncated by 1 byte": lambda p: os.truncate(p, p.stat().st_size - 1),
    "byte flipped in /model/W2": lambda p: flip_byte(p, "model/W2", 9),
    "byte flipped in /optimizer/t": lambda p: flip_byte(p, "optimizer/t"),
    "byte flipped in /rng/step_in_epoch": lambda p: flip_byte(p, "rng/step_in_epoch"),
    "byte flipped in /preprocess/std": lambda p: flip_byte(p, "preprocess/std", 3),
    "dataset deleted": lambda p: _delete(p, "model/b2"),
    "group deleted": lambda p: _delete(p, "rng"),
    "byte flipped in /metrics/interval": lambda p: flip_byte(p, "metrics/interval/loss_sum"),
    "not HDF5": lambda p: p.write_bytes(b"this is not an HDF5 file\n" * 40),
    "byte flipped in the header's hash": lambda p: _flip_at(p, 30),
    "byte flipped in the header's padding": lambda p: _flip_at(p, 511),
    "byte flipped in the HDF5 superblock": lambda p: _flip_at(p, 512 + 8),
    "byte appended": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    "attribute rewritten with h5py": lambda p: _rewrite_attr(p, "/", "step", 8),
}
NO_HEADER = "no distbp checksum header (not a distbp checkpoint, or written by a foreign tool)"
MISMATCH = "file checksum mismatch (corrupt or truncated): "


def _expected_message(kind: str, size: int) -> str:
    """What load() says for CORRUPTIONS[kind] applied to a file of `size` bytes."""
    if kind in ("truncated to 0 bytes", "not HDF5"):
        return NO_HEADER
    if kind in ("truncated to 300 bytes", "byte flipped in the header's hash",
                "byte flipped in the header's padding"):
        return MISMATCH + "damaged checksum header"
    if kind.startswith("truncated"):
        fraction = {"10%": 0.1, "50%": 0.5, "90%": 0.9}.get(kind.split()[-1])
        new = size - 1 if fraction is None else int(size * fraction)
        return MISMATCH + f"{new} bytes but its header says {size}"
    if kind == "byte appended":
        return MISMATCH + f"{size + 1} bytes but its header says {size}"
    return MISMATCH + "SHA-256 of the file differs from its header"


def _flip_at(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _delete(path: Path, name: str) -> None:
    with h5py.File(path, "a") as f:
        del f[name]


def _rewrite_attr(path: Path, where: str, name: str, value) -> None:
    with h5py.File(path, "a") as f:
        f[where].attrs[name] = value


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_raises_one_line_error_naming_file(tmp_path, kind):
    path = ck.save(tmp_path, **run_state())
    size = path.stat().st_size
    CORRUPTIONS[kind](path)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    assert str(info.value) == f"checkpoint '{path}': {_expected_message(kind, size)}"


@pytest.mark.parametrize("kind,expected", [
    ("byte flipped in /model/W2", "dataset /model/W2 fails its SHA-256 check (file corrupt)"),
    ("byte flipped in /optimizer/t", "dataset /optimizer/t fails its SHA-256 check"),
    ("byte flipped in /rng/step_in_epoch", "dataset /rng/step_in_epoch fails its SHA-256 check"),
    ("byte flipped in /preprocess/std", "dataset /preprocess/std fails its SHA-256 check"),
    ("dataset deleted", "missing dataset /model/b2"),
    ("group deleted", "missing group /rng"),
    ("byte flipped in /metrics/interval",
     "dataset /metrics/interval/loss_sum fails its SHA-256 check"),
])
def test_damage_behind_a_recomputed_file_hash_is_still_caught(tmp_path, kind, expected):
    # defence in depth: a tool that rewrote the header over damaged data does not get it loaded
    path = ck.save(tmp_path, **run_state())
    CORRUPTIONS[kind](path)
    reseal(path)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    assert str(info.value).startswith(f"checkpoint '{path}': {expected}")


@pytest.mark.parametrize("group", ["metrics/interval", "preprocess"])
def test_a_checkpoint_without_a_group_of_the_format_is_refused(tmp_path, group):
    older = ck.save(tmp_path, keep=None, **run_state(step=1))
    path = ck.save(tmp_path, keep=None, **run_state(step=2))
    _delete(path, group)   # both are part of every checkpoint (/preprocess may be empty)
    reseal(path)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    assert str(info.value) == f"checkpoint '{path}': missing group /{group}"
    assert ck.latest_valid(tmp_path) == (older, [(path, str(info.value))])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_latest_valid_skips_corrupt_newest_and_falls_back(tmp_path, kind):
    paths = [ck.save(tmp_path, keep=None, **run_state(step=s)) for s in (1, 2, 3)]
    CORRUPTIONS[kind](paths[2])
    junk = tmp_path / "ckpt-00000009.h5"
    junk.write_bytes(b"\x00" * 100)
    found, skipped = ck.latest_valid(tmp_path)
    assert found == paths[1]
    assert [p for p, _ in skipped] == [junk, paths[2]]
    assert all(reason.startswith(f"checkpoint '{p}': ") for p, reason in skipped)


def test_load_reports_missing_file_wrong_format_version_and_shape(tmp_path):
    with pytest.raises(CheckpointError, match="ckpt-00000001.h5': not found"):
        ck.load(tmp_path / "ckpt-00000001.h5")
    cases = [("/", "format", "something-else", "not a distbp checkpoint"),
             ("/", "format_version", 2, "format_version 2 is not supported"),
             ("model", "layers", np.array([4, 6, 3]),
              r"dataset /model/W1 is float64 \(5, 4\) but layers 4,6,3 and dtype float64 need "
              + r"\(6, 4\)")]
    for step, (where, name, value, pattern) in enumerate(cases):
        path = ck.save(tmp_path, keep=None, **run_state(step=step))
        _rewrite_attr(path, where, name, value)
        reseal(path)
        with pytest.raises(CheckpointError, match=pattern):
            ck.load(path)
    found, skipped = ck.latest_valid(tmp_path)
    assert found is None and len(skipped) == 3
    assert ck.latest_valid(tmp_path / "nowhere") == (None, [])


@pytest.mark.parametrize("dtype", [h5py.vlen_dtype(np.int64), h5py.string_dtype(),
                                   np.dtype([("a", "f8"), ("b", "i4")])])
def test_load_refuses_datasets_that_are_not_plain_numbers(tmp_path, dtype):
    path = ck.save(tmp_path, **run_state())
    with h5py.File(path, "a") as f:
        ds = f["optimizer"].create_dataset("evil", shape=(2,), dtype=dtype)
        ds.attrs["sha256"] = "0" * 64
    reseal(path)
    with pytest.raises(CheckpointError, match="dataset /optimizer/evil has non-numeric dtype"):
        ck.load(path)


# ------------------------------------------------------------------ whole-file hash, fuzzing

def test_save_writes_a_userblock_header_with_the_size_and_sha256_of_the_rest(tmp_path):
    path = ck.save(tmp_path, **run_state())
    data = path.read_bytes()
    line = (f"distbp-checkpoint sha256 {hashlib.sha256(data[512:]).hexdigest()} "
            f"size {len(data)}\n").encode("ascii")
    assert data[:512] == line + b"\0" * (512 - len(line))
    assert data[512:520] == b"\x89HDF\r\n\x1a\n"  # the HDF5 superblock right after it
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 512 and f.attrs["step"] == 7


def _no_hdf5(*args, **kwargs):
    raise AssertionError("load() opened the file with HDF5 before checking it")


def test_old_layout_without_header_is_refused_before_hdf5_parses_it(tmp_path, monkeypatch):
    path = ck.save(tmp_path, **run_state())
    old = tmp_path / "old.h5"
    old.write_bytes(path.read_bytes()[512:])  # the same HDF5 file, without the userblock
    with h5py.File(old, "r") as f:
        assert f.attrs["step"] == 7 and f.userblock_size == 0
    monkeypatch.setattr(ck.h5py, "File", _no_hdf5)
    with pytest.raises(CheckpointError) as info:
        ck.load(old)
    assert str(info.value) == f"checkpoint '{old}': {NO_HEADER}"


def test_size_differing_from_the_header_is_refused_before_hashing(tmp_path, monkeypatch):
    path = ck.save(tmp_path, **run_state())
    size = path.stat().st_size
    os.truncate(path, size - 700)
    monkeypatch.setattr(ckpt_integrity, "file_digest", _no_hdf5)
    monkeypatch.setattr(ck.h5py, "File", _no_hdf5)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    assert str(info.value) == (f"checkpoint '{path}': {MISMATCH}{size - 700} bytes but its header "
                               f"says {size}")


def test_hdf5_open_for_writing_flag_is_tolerated_but_other_flag_values_are_not(tmp_path):
    # HDF5 sets the superblock's consistency flags (file offset 532) to 1 while a process holds
    # the file open for writing: the content is unchanged, so the checkpoint must still load
    path = ck.save(tmp_path, **run_state())
    saved = ck.load(path)
    for value in (1, 2, 0x80):
        data = bytearray(path.read_bytes())
        data[532] = value
        path.write_bytes(data)
        if value == 1:
            got = ck.load(path)
            assert got.params.tobytes() == saved.params.tobytes() and got.step == saved.step
            continue
        with pytest.raises(CheckpointError) as info:
            ck.load(path)
        assert str(info.value) == (f"checkpoint '{path}': {MISMATCH}HDF5 superblock flags are "
                                   f"{value:#x}, not 0 or 1")


FUZZ_SCRIPT = """
import json, sys
from pathlib import Path
from distbp import checkpoint as ck
from distbp.errors import CheckpointError

source, work = Path(sys.argv[1]), Path(sys.argv[2])
original = source.read_bytes()
for kind, offset in json.load(sys.stdin):
    data = bytearray(original)
    if kind == "flip":
        data[offset] ^= 0xFF
    else:
        data[offset:offset + 512] = bytes(len(data[offset:offset + 512]))
    work.write_bytes(data)
    try:
        ck.load(work)
        verdict = "LOADED"
    except CheckpointError as e:
        one_line = str(e).startswith(f"checkpoint '{work}': ") and "\\n" not in str(e)
        verdict = "error" if one_line else "MESSAGE " + repr(str(e))
    except Exception as e:
        verdict = f"RAISED {type(e).__name__}: {e}"
    print(kind, offset, verdict, flush=True)
"""


def _fuzz_batch(script: Path, source: Path, work: Path, batch: list) -> list[str]:
    """Run one child over `batch`; a crash, hang or missing verdict becomes a failure line."""
    try:
        proc = subprocess.run([sys.executable, str(script), str(source), str(work)],
                              input=json.dumps(batch), capture_output=True, text=True,
                              timeout=60, env=child_env())
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:  # its partial output comes back as bytes
        out, rc = (e.stdout or b"").decode(errors="replace"), "timeout (hang)"
    lines = out.splitlines()
    failures = [line for line in lines if not line.endswith(" error")]
    if rc != 0 or len(lines) != len(batch):
        where = batch[len(lines)] if len(lines) < len(batch) else "after the last mutation"
        failures.append(f"child died ({rc}) at mutation {where}")
    return failures


def test_every_damaged_byte_or_block_gives_checkpoint_error_never_crash_hang_or_value(
        tmp_path):
    # one flipped byte in HDF5 metadata used to segfault libhdf5, 512 zeroed bytes to hang it, and
    # flipped attributes to load wrong values: every mutation must now be a clean CheckpointError.
    # Children do the loading, so a segfault or hang fails this test instead of killing pytest.
    source = ck.save(tmp_path / "src", **run_state())
    original = source.read_bytes()
    n = len(original)
    mutations = ([["flip", o] for o in range(min(4096, n))]          # header, superblock, ...
                 + [["flip", o] for o in range(4096, n, 3)]         # a third of the rest
                 + [["zero", o] for o in range(0, n, 512) if any(original[o:o + 512])])
    assert n > 10_000 and len(mutations) > 8000
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_SCRIPT)
    failures = []
    for i in range(0, len(mutations), 3000):
        failures += _fuzz_batch(script, source, tmp_path / "work.h5", mutations[i:i + 3000])
    assert failures == [], f"{len(failures)} bad outcomes, first: {failures[:10]}"
