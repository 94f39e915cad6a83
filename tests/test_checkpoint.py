"""Checkpoints: bitwise round trip, plain-h5py readability (also of a real `distbp train` output),
the whole-file SHA-256 header, corruption detection (fuzzed: never a crash, hang or wrong value),
rotation, crash safety (children killed mid-save), compatibility messages."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, run_py

from distbp import checkpoint as ck
from distbp import ckpt_integrity
from distbp.errors import CheckpointError

LAYERS = (4, 5, 3)
N_PARAMS = 4 * 5 + 5 + 5 * 3 + 3  # W1 (5, 4), b1 (5,), W2 (3, 5), b2 (3,)


def run_state(dtype: str = "float64", optimizer: str = "adam", step: int = 7, seed: int = 0,
              layers=LAYERS) -> dict:
    """Keyword arguments for ck.save describing a plausible run at `step`."""
    rng = np.random.default_rng(seed + step)
    n = sum(a * b + b for a, b in itertools.pairwise(layers))
    params = rng.standard_normal(n).astype(dtype)
    params[:2] = [-0.0, np.finfo(dtype).smallest_subnormal]  # bit patterns a cast would lose
    if optimizer == "adam":
        state = {"m": rng.standard_normal(n).astype(dtype),
                 "v": rng.random(n).astype(dtype), "t": np.array(step, dtype=np.int64)}
    else:
        state = {"velocity": rng.standard_normal(n).astype(dtype)}
    state["_scratch"] = np.ones(n, dtype=dtype)
    config = {"model": {"layers": list(layers), "activation": "sigmoid"},
              "optim": {"lr": 0.1, "momentum": None, "nesterov": False},
              "note": "naïve — ünïcode"}
    preprocess = {"mean": rng.random(layers[0]), "std": rng.random(layers[0]).astype(np.float32)}
    return {"step": step, "epoch": 2, "step_in_epoch": step % 5, "seed": seed,
            "layers": list(layers), "activation": "sigmoid", "output": "softmax",
            "loss": "cross_entropy", "params": params, "optimizer_name": optimizer,
            "optimizer_state": state, "config": config,
            "metrics": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(step)],
            "world_size": 3, "preprocess": preprocess}


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


# ------------------------------------------------------------------------- round trip, layout

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_save_then_load_round_trips_every_field_bitwise(tmp_path, dtype, optimizer):
    from distbp import __version__

    state = run_state(dtype, optimizer)
    path = ck.save(tmp_path / "a" / "b", **state)
    assert path == tmp_path / "a" / "b" / "ckpt-00000007.h5"
    got = ck.load(path)
    assert got.params.dtype == np.dtype(dtype) and got.params.shape == (N_PARAMS,)
    assert got.params.tobytes() == state["params"].tobytes()
    expected_state = {k: v for k, v in state["optimizer_state"].items() if k != "_scratch"}
    assert sorted(got.optimizer_state) == sorted(expected_state)
    for key, value in expected_state.items():
        assert got.optimizer_state[key].dtype == value.dtype
        assert got.optimizer_state[key].shape == value.shape
        assert got.optimizer_state[key].tobytes() == value.tobytes()
    if optimizer == "adam":
        assert got.optimizer_state["t"].shape == () and int(got.optimizer_state["t"]) == 7
    for key, value in state["preprocess"].items():
        assert got.preprocess[key].dtype == value.dtype
        assert got.preprocess[key].tobytes() == value.tobytes()
    assert sorted(got.preprocess) == ["mean", "std"]
    assert (got.step, got.epoch, got.step_in_epoch, got.seed) == (7, 2, 2, 0)
    assert got.layers == LAYERS and got.dtype == dtype
    assert (got.activation, got.output, got.loss) == ("sigmoid", "softmax", "cross_entropy")
    assert got.optimizer_name == optimizer and got.config == state["config"]
    assert got.metrics == state["metrics"] and got.world_size == 3
    assert got.distbp_version == __version__ and got.path == path


def test_missing_preprocess_and_empty_metrics_round_trip(tmp_path):
    state = run_state()
    state.update(preprocess=None, metrics=[])
    got = ck.load(ck.save(tmp_path, **state))
    assert got.preprocess == {} and got.metrics == []


def test_plain_h5py_reader_understands_the_file_without_distbp(tmp_path):
    state = run_state("float32", "adam")
    path = ck.save(tmp_path, **state)
    p = state["params"]
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "distbp-checkpoint" and f.attrs["format_version"] == 1
        assert f.attrs["step"] == 7 and f.attrs["epoch"] == 2 and f.attrs["world_size"] == 3
        assert isinstance(f.attrs["created"], str) and isinstance(f.attrs["distbp_version"], str)
        model = f["model"]
        assert list(model.attrs["layers"]) == [4, 5, 3] and model.attrs["dtype"] == "float32"
        assert model.attrs["activation"] == "sigmoid" and model.attrs["loss"] == "cross_entropy"
        assert model["W1"].shape == (5, 4) and model["b1"].shape == (5,)
        assert model["W2"].shape == (3, 5) and model["b2"].shape == (3,)
        # flat layout written out by hand: W1 row-major (20), b1 (5), W2 (15), b2 (3)
        np.testing.assert_array_equal(model["W1"][()], p[0:20].reshape(5, 4))
        np.testing.assert_array_equal(model["b1"][()], p[20:25])
        np.testing.assert_array_equal(model["W2"][()], p[25:40].reshape(3, 5))
        np.testing.assert_array_equal(model["b2"][()], p[40:43])
        assert f["optimizer"].attrs["name"] == "adam"
        assert sorted(f["optimizer"]) == ["m", "t", "v"]  # no "_scratch"
        assert f["optimizer/t"].shape == () and f["optimizer/t"][()] == 7
        config = json.loads(f["config/json"].asstr()[()])
        assert config["optim"]["lr"] == 0.1 and config["note"] == "naïve — ünïcode"
        assert [f["rng"][k][()] for k in ("seed", "epoch", "step_in_epoch")] == [0, 2, 2]
        lines = f["metrics/jsonl"].asstr()[()].splitlines()
        assert [json.loads(line) for line in lines] == state["metrics"]
        np.testing.assert_array_equal(f["preprocess/mean"][()], state["preprocess"]["mean"])
        w2 = f["model/W2"]
        assert w2.attrs["sha256"] == hashlib.sha256(w2[()].tobytes()).hexdigest()
        text = f["config/json"]
        assert text.attrs["sha256"] == hashlib.sha256(text[()]).hexdigest()


def test_param_shapes_are_w_out_by_in_then_bias():
    assert ck.param_shapes([4, 5, 3]) == [((5, 4), (5,)), ((3, 5), (3,))]


PLAIN_READER = """
import hashlib, json, sys
import h5py
import numpy as np

with h5py.File(sys.argv[1], "r") as f:
    m = f["model"]
    w1 = np.asarray(m["W1"][()])
    out = {"root": {k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k]
                    for k in ("format", "format_version", "step", "epoch", "world_size")},
           "layers": m.attrs["layers"].tolist(), "dtype": m.attrs["dtype"],
           "model": [m.attrs[k] for k in ("activation", "output", "loss")],
           "shapes": {k: list(m[k].shape) for k in m}, "W1": w1.tolist(),
           "W1_sha256_ok": m["W1"].attrs["sha256"] == hashlib.sha256(w1.tobytes()).hexdigest(),
           "optimizer": f["optimizer"].attrs["name"],
           "config": json.loads(f["config/json"].asstr()[()])}
out["distbp_modules"] = sorted(n for n in sys.modules if n.split(".")[0] == "distbp")
print(json.dumps(out))
"""


def test_real_train_output_is_read_by_a_process_that_imports_only_h5py_and_numpy(tmp_path):
    rng = np.random.default_rng(3)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    train = run_py(["-m", "distbp", "train", "--data", str(tmp_path / "d.h5"), "--layers",
                    "4,5,3", "--batch-size", "10", "--dtype", "float64", "--steps", "3",
                    "--run-dir", str(tmp_path / "run")], timeout=120)
    assert train.returncode == 0, train.stdout + train.stderr
    path = tmp_path / "run" / "checkpoints" / "ckpt-00000003.h5"
    assert path.read_bytes().startswith(b"distbp-checkpoint sha256 ")  # the header is there
    (tmp_path / "reader.py").write_text(PLAIN_READER)
    child = run_py([str(tmp_path / "reader.py"), str(path)], timeout=60, cwd=tmp_path)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    assert got["distbp_modules"] == []
    assert got["root"] == {"format": "distbp-checkpoint", "format_version": 1, "step": 3,
                           "epoch": 1, "world_size": 1}  # 3 steps of 10 rows: epoch 0 done
    assert got["layers"] == [4, 5, 3] and got["dtype"] == "float64"
    assert got["shapes"] == {"W1": [5, 4], "b1": [5], "W2": [3, 5], "b2": [3]}
    assert got["model"] == ["relu", "softmax", "cross_entropy"] and got["optimizer"] == "sgd"
    assert got["W1_sha256_ok"]
    assert got["config"]["layers"] == [4, 5, 3] and got["config"]["steps"] == 3
    assert got["config"]["batch_size"] == 10 and got["config"]["seed"] == 0
    # W1 (n_out, n_in) is the first 20 entries of the flat parameters, row-major
    np.testing.assert_array_equal(np.array(got["W1"]), ck.load(path).params[:20].reshape(5, 4))


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
])
def test_damage_behind_a_recomputed_file_hash_is_still_caught(tmp_path, kind, expected):
    # defence in depth: a tool that rewrote the header over damaged data does not get it loaded
    path = ck.save(tmp_path, **run_state())
    CORRUPTIONS[kind](path)
    reseal(path)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    assert str(info.value).startswith(f"checkpoint '{path}': {expected}")


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


# --------------------------------------------------------------------------- rotation, names

def test_keep_rotation_retains_only_newest_k(tmp_path):
    for step in range(1, 6):
        ck.save(tmp_path, keep=2, **run_state(step=step))
    assert ck.list_checkpoints(tmp_path) == [ck.checkpoint_path(tmp_path, s) for s in (4, 5)]
    for step in range(6, 9):
        ck.save(tmp_path, keep=None, **run_state(step=step))
    assert len(ck.list_checkpoints(tmp_path)) == 5


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (20, 30):
        ck.save(tmp_path, **run_state(step=step))
    written = ck.save(tmp_path, keep=1, **run_state(step=11))  # e.g. resumed from an older one
    assert ck.list_checkpoints(tmp_path) == [written, ck.checkpoint_path(tmp_path, 30)]


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    ck.save(tmp_path, **run_state(seed=1))
    second = run_state(seed=2)
    path = ck.save(tmp_path, **second)
    assert ck.list_checkpoints(tmp_path) == [path]
    assert ck.load(path).params.tobytes() == second["params"].tobytes()


def test_list_checkpoints_matches_exactly_eight_digits_sorted_by_step(tmp_path):
    for name in ("ckpt-00000010.h5", "ckpt-00000002.h5", "ckpt-1.h5", "ckpt-000000003.h5",
                 "ckpt-00000004.h5.bak", ".tmp-ckpt-00000005.h5.123", "xckpt-00000006.h5"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ckpt-00000007.h5").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-00000002.h5",
                                                               "ckpt-00000010.h5"]
    assert ck.checkpoint_path("ck", 10) == Path("ck/ckpt-00000010.h5")
    assert ck.list_checkpoints(tmp_path / "missing") == []


def test_stale_temp_file_is_ignored_then_cleaned_by_next_save(tmp_path):
    good = ck.save(tmp_path, **run_state(step=1))
    stale = tmp_path / ".tmp-ckpt-00000002.h5.4242"
    stale.write_bytes(good.read_bytes()[:1000])
    assert ck.latest_valid(tmp_path) == (good, [])
    ck.save(tmp_path, **run_state(step=2))
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.h5", "ckpt-00000002.h5"]


def test_save_refuses_a_file_where_the_directory_should_be(tmp_path):
    (tmp_path / "ck").write_text("a file")
    with pytest.raises(CheckpointError, match="'.*ck' exists and is not a directory"):
        ck.save(tmp_path / "ck", **run_state())


def test_save_rejects_params_that_do_not_fit_layers(tmp_path):
    state = run_state()
    state["params"] = state["params"][:-1]
    with pytest.raises(ValueError, match="do not fit layers 4,5,3 \\(43 parameters\\)"):
        ck.save(tmp_path, **state)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ crash safety

CRASH_SCRIPT = """
import os, sys
import h5py
import numpy as np
from distbp import checkpoint as ck

directory, point = sys.argv[1], sys.argv[2]
layers = [4, 5, 3]
state = dict(step=2, epoch=0, step_in_epoch=2, seed=0, layers=layers, activation="tanh",
             output="identity", loss="mse", params=np.zeros(43), optimizer_name="sgd",
             optimizer_state={}, config={}, metrics=[], world_size=1)
die = lambda *a, **k: os._exit(9)
if point == "write":  # die in the middle of writing datasets
    create, calls = h5py.Group.create_dataset, []
    def create_dataset(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os._exit(9)
        return create(self, *a, **k)
    h5py.Group.create_dataset = create_dataset
elif point == "fsync":  # die before the file is durable
    os.fsync = die
elif point == "replace":  # die just before the rename
    os.replace = die
elif point == "dir-fsync":  # die after the rename, before the directory fsync
    fsync, calls = os.fsync, []
    def fsync_second_dies(fd):
        calls.append(fd)
        if len(calls) == 2:
            os._exit(9)
        fsync(fd)
    os.fsync = fsync_second_dies
ck.save(directory, **state)
"""


@pytest.mark.parametrize("point,survivor", [("write", 1), ("fsync", 1), ("replace", 1),
                                            ("dir-fsync", 2)])
def test_crash_during_save_leaves_only_complete_checkpoints(tmp_path, point, survivor):
    first = ck.save(tmp_path, **run_state(step=1))
    script = tmp_path.parent / f"crash_{point}.py"
    script.write_text(CRASH_SCRIPT)
    proc = run_py([str(script), str(tmp_path), point], timeout=60)
    assert proc.returncode == 9, proc.stderr
    names = ck.list_checkpoints(tmp_path)
    assert names == [first, ck.checkpoint_path(tmp_path, 2)][:survivor]
    for path in names:
        ck.load(path)
    assert ck.latest_valid(tmp_path) == (names[-1], [])
    if survivor == 1:  # the torn temp file is left behind, invisible, until the next save
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    ck.save(tmp_path, **run_state(step=3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


LOOP_SCRIPT = """
import sys
import numpy as np
from distbp import checkpoint as ck

directory, start = sys.argv[1], int(sys.argv[2])
layers = [200, 300, 10]
n = 200 * 300 + 300 + 300 * 10 + 10
rng = np.random.default_rng(start)
for step in range(start, start + 10**6):
    params = rng.standard_normal(n)
    ck.save(directory, step=step, epoch=0, step_in_epoch=step, seed=0, layers=layers,
            activation="relu", output="softmax", loss="cross_entropy", params=params,
            optimizer_name="adam",
            optimizer_state={"m": params * 0.5, "v": params**2, "t": np.int64(step)},
            config={"step": step}, metrics=[{"step": s} for s in range(step)],
            world_size=1, keep=2)
    print("saved", step, flush=True)
"""


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    directory = tmp_path / "ck"
    chooser = random.Random(1234)
    start = 0
    for _ in range(5):
        child = subprocess.Popen([sys.executable, str(script), str(directory), str(start)],
                                 stdout=subprocess.PIPE, text=True, env=child_env())
        try:
            assert child.stdout.readline().startswith("saved")
            time.sleep(chooser.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
        present = ck.list_checkpoints(directory)
        assert present, "at least the first save of each child completed"
        for path in present:
            assert ck.load(path).step == int(path.name[5:13])
        assert ck.latest_valid(directory) == (present[-1], [])
        start = ck.load(present[-1]).step + 1


# ----------------------------------------------------------------------------- compatibility

MODEL = {"layers": [4, 5, 3], "activation": "sigmoid", "output": "softmax",
         "loss": "cross_entropy", "dtype": "float64"}


@pytest.mark.parametrize("field,value,expected", [
    ("layers", [4, 6, 3], "layers 4,5,3 but the configuration asks for 4,6,3"),
    ("activation", "relu", "activation sigmoid but the configuration asks for relu"),
    ("output", "identity", "output softmax but the configuration asks for identity"),
    ("loss", "mse", "loss cross_entropy but the configuration asks for mse"),
    ("dtype", "float32", "dtype float64 but the configuration asks for float32"),
])
def test_check_compatible_names_the_difference(tmp_path, field, value, expected):
    ckpt = ck.load(ck.save(tmp_path, **run_state()))
    ck.check_compatible(ckpt, **MODEL)  # the same model: no error
    with pytest.raises(CheckpointError) as info:
        ck.check_compatible(ckpt, **{**MODEL, field: value})
    assert str(info.value) == f"checkpoint '{ckpt.path}' has {expected}"


def test_check_compatible_names_every_difference_at_once(tmp_path):
    ckpt = ck.load(ck.save(tmp_path, **run_state()))
    with pytest.raises(CheckpointError) as info:
        ck.check_compatible(ckpt, layers=[4, 3], activation="tanh", output="identity",
                            loss="mse", dtype="float32")
    message = str(info.value)
    for part in ("layers 4,5,3 but the configuration asks for 4,3",
                 "activation sigmoid but", "output softmax but", "loss cross_entropy but",
                 "dtype float64 but the configuration asks for float32"):
        assert part in message
    assert "\n" not in message


# ------------------------------------------------------------------------- shared file systems

HOLD_OPEN = """
import sys
import h5py
files = [h5py.File(path, "r+") for path in sys.argv[1:]]   # open for writing: HDF5 locks them
print("open", flush=True)
sys.stdin.read()                                           # until the test closes stdin
"""


def test_resume_evaluate_and_inspect_read_files_another_process_holds_open_for_writing(
        tmp_path, monkeypatch, capsys):
    # HDF5's file locks fail on NFS/Lustre, and a writer's lock blocks a locking reader; distbp
    # opens what it reads with locking=False (data files, checkpoints), so neither stops it.
    from distbp import data
    from distbp.cli import main

    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    train = ["train", "--data", str(tmp_path / "d.h5"), "--layers", "4,5,3", "--batch-size",
             "10", "--dtype", "float64", "--run-dir", str(tmp_path / "run")]
    assert main([*train, "--steps", "3"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000003.h5"
    saved = ck.load(ckpt)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(tmp_path / "d.h5"), str(ckpt)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="unable to lock file"):   # what a locking reader gets
            h5py.File(ckpt, "r")
        assert ck.load(ckpt).params.tobytes() == saved.params.tobytes()
        ds = data.open_dataset(tmp_path / "d.h5")
        np.testing.assert_array_equal(ds.read(np.arange(30))[0], x)
        ds.close()
        capsys.readouterr()
        assert main(["inspect", str(ckpt)]) == 0
        assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "d.h5")]) == 0
        assert main([*train, "--steps", "6", "--resume", "auto"]) == 0
        out = capsys.readouterr().out
        assert f"checkpoint {ckpt}: OK" in out and "(step 3) on" in out
        assert f"resumed from {ckpt} at step 3" in out
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert ck.load(tmp_path / "run" / "checkpoints" / "ckpt-00000006.h5").step == 6
