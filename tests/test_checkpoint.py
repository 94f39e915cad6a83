"""Checkpoints: bitwise round trip, plain-h5py readability, corruption detection, rotation,
crash safety (children killed mid-save), compatibility messages."""

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


# ------------------------------------------------------------------------------- corruption

CORRUPTIONS = {
    "truncated to 0 bytes": lambda p: truncate(p, 0.0),
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
}


def _delete(path: Path, name: str) -> None:
    with h5py.File(path, "a") as f:
        del f[name]


def _rewrite_attr(path: Path, where: str, name: str, value) -> None:
    with h5py.File(path, "a") as f:
        f[where].attrs[name] = value


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_raises_one_line_error_naming_file(tmp_path, kind):
    path = ck.save(tmp_path, **run_state())
    CORRUPTIONS[kind](path)
    with pytest.raises(CheckpointError) as info:
        ck.load(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint '{path}': ") and "\n" not in message
    if kind.startswith("byte flipped"):
        dataset = kind.split(" in ")[1]
        assert f"dataset {dataset} fails its SHA-256 check (file corrupt)" in message
    elif kind == "dataset deleted":
        assert "missing dataset /model/b2" in message
    elif kind == "group deleted":
        assert "missing group /rng" in message
    else:
        assert "truncated or not HDF5" in message


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
    with pytest.raises(CheckpointError, match="dataset /optimizer/evil has non-numeric dtype"):
        ck.load(path)


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
