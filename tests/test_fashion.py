"""Fashion-MNIST end to end: `distbp data fashion-mnist` from Debian's package, from a directory
of raw IDX files and by download (a local HTTP server, never the internet; corrupt files are
refused); preprocessing (scale, standardize) and label forms (ints, one-hot); the preset on a
subset under 2 ranks. The full preset run (minutes) is opt-in: DISTBP_FULL=1."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BIN, ROOT, child_env, run_mpi

from distbp import checkpoint, data, preprocess
from distbp.cli import main
from distbp.comm import SerialComm
from distbp.config_schema import TrainConfig
from distbp.data_import import fashion_mnist
from distbp.session import build_session
from distbp.trainer import Trainer

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(not DEBIAN.is_dir(),
                                  reason="apt-get install dataset-fashion-mnist (CI installs it)")
NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _upstream_parse(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's mnist_reader.py: the bytes after the 16- and 8-byte headers."""
    images, labels = (directory / f"{n}.gz" for n in NAMES[split])
    with gzip.open(images) as fi, gzip.open(labels) as fl:
        y = np.frombuffer(fl.read(), np.uint8, offset=8)
        return np.frombuffer(fi.read(), np.uint8, offset=16).reshape(len(y), 784), y


def _assert_same_files(a: Path, b: Path) -> None:
    for split in NAMES:
        with h5py.File(a / f"fashion-mnist-{split}.h5") as fa, \
                h5py.File(b / f"fashion-mnist-{split}.h5") as fb:
            assert np.array_equal(fa["x"][...], fb["x"][...])
            assert np.array_equal(fa["y"][...], fb["y"][...])


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """A working directory with data/fashion-mnist-{train,test}.h5 built from Debian's files."""
    if not DEBIAN.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)")
    work = tmp_path_factory.mktemp("fashion")
    fashion_mnist(work / "data", log=lambda line: None)
    return work


# ----------------------------------------------------------------------------- the data command

@needs_debian
def test_fashion_mnist_files_hold_exactly_the_debian_idx_contents(fashion):
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = _upstream_parse(DEBIAN, split)
        with h5py.File(fashion / "data" / f"fashion-mnist-{split}.h5") as f:
            assert f["x"].shape == (n, 784) and f["x"].dtype == np.uint8
            assert np.array_equal(f["x"][...], x) and np.array_equal(f["y"][...], y)
            assert f.attrs["scale"] == 1 / 255 and "Debian" in f.attrs["source"]
        assert np.bincount(y).tolist() == [n // 10] * 10


@needs_debian
def test_fashion_mnist_from_a_directory_of_raw_and_gzip_idx_files(fashion, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in NAMES["test"]:  # raw IDX; the train files stay gzip (links to Debian's)
        with gzip.open(DEBIAN / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    for name in NAMES["train"]:
        (raw / f"{name}.gz").symlink_to(DEBIAN / f"{name}.gz")
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "d"), "--from", str(raw),
                 "--compression", "none"]) == 0  # uncompressed: 10x faster to write
    assert capsys.readouterr().out.count("MD5s verified") == 2
    _assert_same_files(tmp_path / "d", fashion / "data")
    (raw / "t10k-labels-idx1-ubyte").unlink()
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "e"), "--from", str(raw)]) == 2
    assert "t10k-labels-idx1-ubyte.gz (or raw t10k-labels-idx1-ubyte) not found" in \
        capsys.readouterr().err


class _Server:
    """http.server in a thread serving one directory on 127.0.0.1 (a free port)."""

    def __init__(self, directory: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = functools.partial(Quiet, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(tmp_path):
    """A copy of Debian's four .gz files under <root>/files/, served over local HTTP."""
    files = tmp_path / "www" / "files"
    shutil.copytree(DEBIAN, files)
    with _Server(tmp_path / "www") as server:
        yield server, files


@needs_debian
def test_download_from_a_local_server_builds_the_same_files(fashion, served, tmp_path, capsys):
    server, _ = served
    out = tmp_path / "d"
    assert main(["data", "fashion-mnist", "--out", str(out), "--download",
                 "--url", server.url, "--compression", "none"]) == 0
    text = capsys.readouterr().out
    assert text.count("downloading " + server.url) == 4 and text.count("MD5s verified") == 2
    _assert_same_files(out, fashion / "data")
    assert sorted(p.name for p in out.iterdir()) == ["fashion-mnist-test.h5",
                                                     "fashion-mnist-train.h5"]


@needs_debian
def test_download_refuses_altered_truncated_and_missing_files(served, tmp_path, capsys):
    server, files = served
    labels = files / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: a valid gzip, a wrong MD5
    labels.write_bytes(gzip.compress(bytes(content)))
    out = tmp_path / "d"
    argv = ["data", "fashion-mnist", "--out", str(out), "--download", "--url", server.url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte.gz" in err and "expected 9018921c3c673c538a1fc5bad174d6f9" \
        in err and "corrupt or not the official file" in err
    labels.write_bytes(gzip.compress(bytes(content))[:-100])
    assert main(argv) == 2
    assert "corrupt gzip stream" in capsys.readouterr().err
    labels.unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "download of " + server.url + "train-labels-idx1-ubyte.gz failed: HTTP 404" in err
    assert list(out.iterdir()) == []  # no data file, no leftover download directory


# ----------------------------------------------------------------------------- preprocessing

def _pixels(path: Path, n: int = 400, features: int = 12, seed: int = 0) -> tuple:
    """A uint8 'image' file with scale 1/255, 3 classes and one constant (always 7) feature."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, features), dtype=np.uint8)
    x[:, 3] = 7
    y = (x[:, 0].astype(int) + x[:, 1] > 255).astype(np.uint8) + (x[:, 2] > 200)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
        f.attrs["scale"] = 1 / 255
    return x, y


def test_standardize_is_computed_over_all_ranks_and_stored_in_the_checkpoint(tmp_path):
    x, _ = _pixels(tmp_path / "px.h5")
    run = tmp_path / "run"
    r = run_mpi(2, ["-m", "distbp", "train", "--data", str(tmp_path / "px.h5"), "--standardize",
                    "--dtype", "float64", "--layers", "12,8,3", "--steps", "3",
                    "--batch-size", "40", "--run-dir", str(run)], timeout=60)
    assert r.returncode == 0, r.stderr
    ckpt = checkpoint.load(checkpoint.latest_valid(run / "checkpoints")[0])
    p = ckpt.preprocess
    scaled = x.astype(np.float64) * (1 / 255)
    assert float(p["scale"]) == 1 / 255
    np.testing.assert_allclose(p["mean"], scaled.mean(axis=0), rtol=1e-12, atol=1e-15)
    std = np.sqrt(((scaled - scaled.mean(axis=0)) ** 2).mean(axis=0))
    std[3] = 1.0  # a constant feature passes through (x − mean) / 1 instead of dividing by 0
    np.testing.assert_allclose(p["std"], std, rtol=1e-10)
    z = preprocess.apply(x, p, np.empty((len(x), 12)))  # what evaluate/predict apply
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.delete(z.std(axis=0), 3), 1.0, rtol=1e-10)
    np.testing.assert_allclose(z[:, 3], 0.0, atol=1e-12)


def test_standardize_is_exact_for_features_whose_offset_dwarfs_their_spread(tmp_path):
    # E[x²] − E[x]² loses every digit here (x² ~ 1e12, variance ~ 1e-6); per-rank means and
    # squared deviations, combined by the parallel formula, do not.
    rng = np.random.default_rng(5)
    offset, spread = np.array([1e6, -3e6, 1e6, 0.0]), np.array([1e-3, 1e-2, 1.0, 2.0])
    x = offset + spread * rng.standard_normal((401, 4))    # float64; shares of 201 and 200 rows
    with h5py.File(tmp_path / "far.h5", "w") as f:
        f["x"], f["y"] = x, rng.integers(0, 3, 401)
    run = tmp_path / "run"
    r = run_mpi(2, ["-m", "distbp", "train", "--data", str(tmp_path / "far.h5"), "--standardize",
                    "--dtype", "float64", "--layers", "4,8,3", "--steps", "2",
                    "--batch-size", "64", "--run-dir", str(run)], timeout=60)
    assert r.returncode == 0, r.stderr
    p = checkpoint.load(checkpoint.latest_valid(run / "checkpoints")[0]).preprocess
    mean = x.mean(axis=0)
    std = np.sqrt(((x - mean) ** 2).mean(axis=0))          # two passes, by hand
    np.testing.assert_allclose(p["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(p["std"], std, rtol=1e-6)
    assert np.all(np.abs(p["std"] / spread - 1) < 0.1)     # the spreads drawn, not 1.0


def test_scale_option_overrides_the_files_scale_attribute(tmp_path):
    _pixels(tmp_path / "px.h5")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "px.h5"), "--scale", "0.5", "--steps", "1",
                 "--layers", "12,3", "--run-dir", str(run)]) == 0
    ckpt = checkpoint.load(checkpoint.latest_valid(run / "checkpoints")[0])
    assert float(ckpt.preprocess["scale"]) == 0.5 and "mean" not in ckpt.preprocess


def _trajectory(tmp_path: Path, name: str, y_onehot: bool) -> tuple[np.ndarray, np.ndarray]:
    """Parameters before and after 12 float64 steps on the pixel file, with y as labels or
    one-hot rows (the session is built from the label file, then given one-hot targets)."""
    x, y = _pixels(tmp_path / "px.h5")
    cfg = TrainConfig.from_dict({"data": str(tmp_path / "px.h5"), "layers": [12, 16, 3],
                                 "dtype": "float64", "steps": 12, "batch_size": 48,
                                 "standardize": True, "run_dir": str(tmp_path / name),
                                 "log_every": 100}, "test")
    s = build_session(cfg)
    if y_onehot:
        s.train = data.ArrayDataset(x, np.eye(3)[y], source="one-hot", scale=s.train.scale)
    initial = s.net.params.copy()
    assert Trainer(s, SerialComm(), log=lambda *a: None).train() == 0
    return initial, s.net.params.copy()


def test_one_hot_targets_train_the_same_trajectory_as_int_labels(tmp_path, capsys):
    initial, labels = _trajectory(tmp_path, "labels", y_onehot=False)
    _, onehot = _trajectory(tmp_path, "onehot", y_onehot=True)
    assert np.abs(labels - initial).max() > 1e-3  # the runs moved
    np.testing.assert_allclose(onehot, labels, rtol=0, atol=1e-12)


def test_one_hot_file_trains_from_the_command_line_like_int_labels(tmp_path):
    x, y = _pixels(tmp_path / "px.h5")
    with h5py.File(tmp_path / "onehot.h5", "w") as f:
        f["x"], f["y"] = x, np.eye(3)[y]
        f.attrs["scale"] = 1 / 255
    common = ["--layers", "12,16,3", "--dtype", "float64", "--steps", "12", "--batch-size", "48"]
    for name in ("px", "onehot"):
        assert main(["train", "--data", str(tmp_path / f"{name}.h5"), *common,
                     "--run-dir", str(tmp_path / name)]) == 0
    a, b = (checkpoint.load(checkpoint.latest_valid(tmp_path / n / "checkpoints")[0]).params
            for n in ("px", "onehot"))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the preset

def _val_accuracy(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r for r in records if r.get("kind") == "val"][-1]["accuracy"]


def test_preset_without_the_data_files_says_how_to_create_them(tmp_path):
    r = run_mpi(2, ["-m", "distbp", "train", "--preset", "fashion-mnist", "--run-dir", "r"],
                timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == ("distbp: error: data file 'data/fashion-mnist-train.h5': not "
                                "found; create it with: distbp data fashion-mnist --out data")


@needs_debian
def test_preset_on_a_6000_row_subset_reaches_075_in_2_epochs_on_2_ranks(fashion):
    with h5py.File(fashion / "data" / "fashion-mnist-train.h5") as f, \
            h5py.File(fashion / "subset.h5", "w") as g:
        g["x"], g["y"] = f["x"][:6000], f["y"][:6000]
        g.attrs.update(f.attrs)
    r = run_mpi(2, ["-m", "distbp", "train", "--preset", "fashion-mnist", "--data", "subset.h5",
                    "--epochs", "2", "--run-dir", "sub"], timeout=180, cwd=fashion)
    assert r.returncode == 0, r.stderr
    assert "784-256-128-10" in r.stdout and "validation: data/fashion-mnist-test.h5" in r.stdout
    assert _val_accuracy(fashion / "sub" / "metrics.jsonl") >= 0.75


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTBP_FULL") != "1",
                    reason="the full preset takes minutes: DISTBP_FULL=1 pytest -m slow")
@needs_debian
def test_full_preset_reaches_089_on_2_ranks_within_10_minutes(fashion):
    env = child_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "fashion_mnist.sh")], cwd=fashion,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = re.search(r"test accuracy (\d\.\d+), wall time (\d+) s", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) >= 0.89 and int(m.group(2)) <= 600
