"""Checkpoints, the file itself: bitwise round trip, plain-h5py readability (also of a real
`distbp train` output), rotation and file names, compatibility messages, and reading files
another process holds open for writing.

Also: tests/test_checkpoint_integrity.py (the whole-file SHA-256 header, corruption detection,
fuzzing) and tests/test_checkpoint_crash.py (children killed mid-save). Shared helpers:
tests/helpers/ckptstate.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, run_py
from helpers.ckptstate import LAYERS, N_PARAMS, run_state

from distbp import checkpoint as ck
from distbp.errors import CheckpointError
from distbp.network import Network

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
    assert got.interval == state["interval"] and type(got.interval["steps"]) is int
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
        interval = f["metrics/interval"]
        assert sorted(interval) == ["correct", "loss_sum", "samples", "steps"]
        assert interval["steps"].dtype == np.int64 and interval["steps"][()] == 3
        assert interval["loss_sum"].dtype == np.float64 and interval["loss_sum"][()] == 1 / 3
        w2 = f["model/W2"]
        assert w2.attrs["sha256"] == hashlib.sha256(w2[()].tobytes()).hexdigest()
        text = f["config/json"]
        assert text.attrs["sha256"] == hashlib.sha256(text[()]).hexdigest()


def test_model_datasets_are_the_networks_views_of_its_flat_params(tmp_path):
    net = Network(list(LAYERS), dtype="float64", seed=3)
    state = run_state()
    state["params"] = net.params
    with h5py.File(ck.save(tmp_path, **state), "r") as f:
        for j, (w, b) in enumerate(zip(net.weights, net.biases), start=1):
            np.testing.assert_array_equal(f[f"model/W{j}"][()], w)   # (n_out, n_in)
            np.testing.assert_array_equal(f[f"model/b{j}"][()], b)
    loaded = ck.load(ck.checkpoint_path(tmp_path, state["step"]))
    assert loaded.params.tobytes() == net.params.tobytes()


@pytest.mark.parametrize("keys", [("steps", "loss_sum", "correct"),
                                  ("steps", "loss_sum", "correct", "samples", "time")])
def test_save_refuses_an_interval_without_exactly_the_format_keys_and_writes_nothing(tmp_path,
                                                                                      keys):
    state = run_state()
    state["interval"] = dict.fromkeys(keys, 1.0)
    with pytest.raises(ValueError, match="interval has keys"):
        ck.save(tmp_path, **state)
    assert list(tmp_path.iterdir()) == []


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


def test_runs_setting_aside_in_the_same_second_never_share_a_folder(tmp_path, monkeypatch):
    """Two fresh runs starting within one second each move the newer checkpoints they find into
    a folder of their own: nothing set aside is overwritten."""
    import time

    monkeypatch.setattr(time, "gmtime", lambda *a: time.struct_time((2026, 1, 2, 3, 4, 5,
                                                                     4, 2, 0)))
    first = ck.save(tmp_path, **run_state(step=9, seed=1))
    moved_a = ck.set_aside_newer(tmp_path, 0)
    second = ck.save(tmp_path, **run_state(step=9, seed=2))  # the same name, other contents
    moved_b = ck.set_aside_newer(tmp_path, 0)
    assert [p.name for p in moved_a] == [p.name for p in moved_b] == [first.name]
    assert moved_a[0].parent != moved_b[0].parent
    assert moved_a[0].parent.name.startswith("superseded-20260102T030405Z-")
    assert moved_b[0].parent.name.startswith("superseded-20260102T030405Z-")
    seeds = {ck.load(p).seed for p in (moved_a[0], moved_b[0])}
    assert seeds == {1, 2} and second == first
