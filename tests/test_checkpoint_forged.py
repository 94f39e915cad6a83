"""Forged checkpoints: files whose every SHA-256 matches (anyone can compute them) but whose
fields are not what distbp writes. Every command that loads one (inspect, evaluate, predict,
train --resume, --resume auto) refuses it with one line and exit 2, never a traceback or a
terabyte allocation; --resume auto skips it like a corrupt file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env

from distbp import checkpoint
from distbp.ckpt_integrity import digest, userblock
from distbp.data import synthetic_teacher

MODEL = ("--layers", "8,16,3", "--optimizer", "adam", "--steps", "4", "--checkpoint-every", "2")


def distbp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distbp", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=child_env())


def put_text(f: h5py.File, name: str, text: str) -> None:
    del f[name]
    data = text.encode()
    f.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8"))
    f[name].attrs["sha256"] = digest(data)


def put_array(f: h5py.File, name: str, value: np.ndarray) -> None:
    if name in f:
        del f[name]
    f[name] = value
    f[name].attrs["sha256"] = digest(np.ascontiguousarray(value))


def seal(path: Path) -> None:
    """Recompute the file's header as save() does: the forgery verifies."""
    with open(path, "r+b") as fh:
        block = userblock(fh, os.fstat(fh.fileno()).st_size, path)
        fh.seek(0)
        fh.write(block)


def forge_huge_dataset(f: h5py.File) -> None:
    del f["optimizer/m"]
    f.create_dataset("optimizer/m", (2**44,), np.float32).attrs["sha256"] = "0" * 64


FORGERIES = {
    "metrics_line_not_an_object": (lambda f: put_text(f, "metrics/jsonl", "5\n"),
                                   "/metrics/jsonl line 1 is not a metrics record"),
    "val_record_loss_text": (lambda f: put_text(
        f, "metrics/jsonl", '{"kind": "val", "step": 2, "loss": "low", "accuracy": 1}\n'),
        "/metrics/jsonl line 1 is not a metrics record"),
    "train_record_lr_text": (lambda f: put_text(
        f, "metrics/jsonl", '{"kind": "train", "step": 2, "loss": 0.5, "accuracy": 1, '
                            '"lr": "fast"}\n'),
        "/metrics/jsonl line 1 is not a metrics record"),
    "config_a_list": (lambda f: put_text(f, "config/json", "[]"),
                      "/config/json must be an object of options"),
    "config_wrong_type": (lambda f: put_text(f, "config/json", json.dumps({"batch_size": "x"})),
                          "its configuration: --batch-size must be an integer"),
    "optimizer_state_wrong_shape": (lambda f: put_array(f, "optimizer/m", np.zeros(7, "f4")),
                                    "/optimizer/m has shape (7,)"),
    "dataset_of_2_44_elements": (forge_huge_dataset, "is not stored as save() writes it"),
    "layers_of_terabytes": (lambda f: f["model"].attrs.__setitem__(
        "layers", np.array([2**21, 2**21, 3], np.int64)), "bytes of parameters, more than"),
    "step_as_text": (lambda f: f.attrs.__setitem__("step", "four"),
                     "/step must be an integer in 0..99999999"),
    "preprocess_mean_wrong_shape": (lambda f: (put_array(f, "preprocess/mean", np.zeros(5)),
                                               put_array(f, "preprocess/std", np.ones(5))),
                                    "preprocessing mean has shape (5,)"),
    "preprocess_std_zero": (lambda f: (put_array(f, "preprocess/mean", np.zeros(8, "f4")),
                                       put_array(f, "preprocess/std", np.zeros(8, "f4"))),
                            "preprocessing std must be finite and positive"),
    "preprocess_scale_nan": (lambda f: put_array(f, "preprocess/scale", np.array(np.nan, "f4")),
                             "preprocessing scale must be finite and positive"),
    "parameters_nan": (lambda f: put_array(f, "model/W1", np.full_like(f["model/W1"][()],
                                                                       np.nan)),
                       "/model holds non-finite parameters"),
    "adam_v_negative": (lambda f: put_array(f, "optimizer/v", -np.ones_like(
        f["optimizer/v"][()])), "/optimizer/v holds non-finite or negative values"),
    "adam_step_negative": (lambda f: put_array(f, "optimizer/step", np.array(-5, np.int64)),
                           "/optimizer/step holds non-finite or negative values"),
    "adam_m_inf": (lambda f: put_array(f, "optimizer/m", np.full_like(
        f["optimizer/m"][()], np.inf)), "/optimizer/m holds non-finite values"),
    "metrics_loss_beyond_float": (lambda f: put_text(
        f, "metrics/jsonl", '{"kind": "val", "step": 2, "loss": 1' + "0" * 400 +
                            ', "accuracy": 1}\n'), "/metrics/jsonl line 1 is not a metrics record"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run (checkpoints at steps 2 and 4) and its data file."""
    d = tmp_path_factory.mktemp("forged")
    ds = synthetic_teacher(64, 8, 3, seed=1)
    data = d / "data.h5"
    with h5py.File(data, "w") as f:
        f.update(x=ds.x, y=ds.y)
    proc = distbp("train", "--data", data, "--run-dir", d / "run", "--keep", "5", *MODEL)
    assert proc.returncode == 0, proc.stderr
    return d / "run", data


def forged(run_dir: Path, tmp: Path, case: str) -> Path:
    source = checkpoint.checkpoint_path(run_dir / "checkpoints", 4)
    target = tmp / "checkpoints" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint.checkpoint_path(run_dir / "checkpoints", 2), target.parent)
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        FORGERIES[case][0](f)
    seal(target)
    return target


def refused(proc: subprocess.CompletedProcess, phrase: str) -> None:
    shown = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 2, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0] and "Traceback" not in proc.stderr, shown


@pytest.mark.parametrize("case", FORGERIES)
def test_forged_checkpoint_is_one_line_for_every_command_that_loads_it(run, tmp_path, case):
    run_dir, data = run
    path = forged(run_dir, tmp_path, case)
    phrase = FORGERIES[case][1]
    refused(distbp("inspect", path), phrase)
    refused(distbp("evaluate", path, "--data", data), phrase)
    refused(distbp("predict", path, "--data", data, "--out", tmp_path / "p.h5"), phrase)
    refused(distbp("train", "--data", data, "--run-dir", tmp_path / "r", *MODEL, "--steps", "6",
                   "--resume", path), phrase)
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("case", ["metrics_line_not_an_object", "optimizer_state_wrong_shape",
                                  "dataset_of_2_44_elements"])
def test_resume_auto_skips_a_forged_checkpoint_like_a_corrupt_one(run, tmp_path, case):
    run_dir, data = run
    forged(run_dir, tmp_path, case)
    proc = distbp("train", "--data", data, "--run-dir", tmp_path, *MODEL, "--steps", "6",
                  "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "skipping checkpoint" in proc.stdout and "resumed from" in proc.stdout, proc.stdout
    assert "ckpt-00000002.h5 at step 2" in proc.stdout, proc.stdout
