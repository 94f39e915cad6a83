"""`distbp data import-idx | synthetic | info`: exact HDF5 contents, the layout promised (uint8
kept, chunked by rows, gzip + shuffle, scale attribute), atomic writes, and exit 2 with one line
naming the file for every malformed input."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from distbp import data
from distbp.cli import main


def _idx(path: Path, a: np.ndarray, code: int = 0x08, compress: bool = True,
         dims: tuple[int, ...] | None = None) -> Path:
    """An IDX file written from the specification (big-endian header, then the values)."""
    dims = a.shape if dims is None else dims
    payload = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) \
        + a.astype(a.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.fixture
def images_labels(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (300, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 4, 300).astype(np.uint8)
    return x, y, _idx(tmp_path / "img.gz", x), _idx(tmp_path / "lab", y, compress=False)


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distbp: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------- import-idx

def test_import_idx_writes_exact_uint8_rows_chunked_compressed_and_scaled(tmp_path,
                                                                        images_labels, capsys):
    x, y, img, lab = images_labels
    out = tmp_path / "sub" / "d.h5"
    assert main(["data", "import-idx", str(img), str(lab), "--out", str(out)]) == 0
    assert "300 rows x 256 uint8, 4 classes" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (300, 256)
        assert np.array_equal(f["x"][...], x.reshape(300, 256))
        assert np.array_equal(f["y"][...], y)
        assert f["x"].chunks == (16384 // 256, 256)  # whole rows, about 16 KiB a chunk
        assert f["x"].compression == "gzip" and f["x"].shuffle
        assert f.attrs["scale"] == 1.0 / 255.0
        assert f.attrs["image_shape"].tolist() == [16, 16]
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.h5"]  # no temp file left
    ds = data.open_dataset(out)
    assert ds.scale == 1.0 / 255.0 and ds.n_features == 256


def test_import_idx_options_set_chunk_rows_and_no_compression(tmp_path, images_labels):
    _, _, img, lab = images_labels
    out = tmp_path / "d.h5"
    assert main(["data", "import-idx", str(img), str(lab), "--out", str(out),
                 "--chunk-rows", "64", "--compression", "none"]) == 0
    with h5py.File(out, "r") as f:
        assert f["x"].chunks == (64, 256) and f["x"].compression is None


def test_import_idx_of_float_images_sets_no_scale(tmp_path):
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    img = _idx(tmp_path / "f.idx", x, code=0x0D, compress=False)
    lab = _idx(tmp_path / "l.idx", np.arange(4, dtype=np.uint8))
    assert main(["data", "import-idx", str(img), str(lab), "--out", str(tmp_path / "f.h5")]) == 0
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f["x"].dtype == np.float32 and np.array_equal(f["x"][...], x)
        assert "scale" not in f.attrs


def test_malformed_idx_inputs_exit_2_naming_the_file_and_leave_no_output(tmp_path, capsys,
                                                                        images_labels):
    x, y, img, lab = images_labels
    out = tmp_path / "out" / "d.h5"
    run = ["data", "import-idx"]
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x00\x00\x07\x03" + bytes(100))
    _fails(capsys, run + [str(bad_magic), str(lab), "--out", str(out)], "'" + str(bad_magic),
           "bad magic")
    cut = tmp_path / "cut"
    cut.write_bytes(gzip.decompress(img.read_bytes())[:-10])
    _fails(capsys, run + [str(cut), str(lab), "--out", str(out)], str(cut), "truncated")
    short = _idx(tmp_path / "short", y[:299])
    _fails(capsys, run + [str(img), str(short), "--out", str(out)], "300 images but 299 labels")
    lying = _idx(tmp_path / "lying", x, dims=(299, 16, 16))  # header counts one item too few
    _fails(capsys, run + [str(lying), str(short), "--out", str(out)], str(lying), "bytes after")
    _fails(capsys, run + [str(lab), str(img), "--out", str(out)], "labels must be 1-D")
    _fails(capsys, run + [str(lab), str(lab), "--out", str(out)], "at least 2 dimensions")
    floats = _idx(tmp_path / "fl", y.astype(np.float32), code=0x0D)
    _fails(capsys, run + [str(img), str(floats), "--out", str(out)], "integers")
    _fails(capsys, run + [str(img), str(tmp_path / "nope"), "--out", str(out)], "not found")
    assert list(out.parent.iterdir()) == []  # failures leave neither a file nor a temp file


# ----------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("kind,make", [("teacher", data.synthetic_teacher),
                                       ("spiral", data.synthetic_spiral)])
def test_synthetic_writes_the_generators_rows_exactly(tmp_path, capsys, kind, make):
    out = tmp_path / f"{kind}.h5"
    assert main(["data", "synthetic", "--out", str(out), "--n", "500", "--features", "6",
                 "--classes", "3", "--seed", "4", "--kind", kind]) == 0
    assert f"synthetic {kind} (n=500" in capsys.readouterr().out
    ref = make(500, 6, 3, 4)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["x"][...], ref.x) and f["x"].dtype == np.float32
        assert np.array_equal(f["y"][...], ref.y) and "scale" not in f.attrs


def test_spiral_arms_are_balanced_and_wind_one_and_a_half_turns():
    ds = data.synthetic_spiral(3000, 4, 3, seed=1)
    assert np.bincount(ds.y).tolist() == [1000] * 3
    r = np.hypot(ds.x[:, 0], ds.x[:, 1]).astype(np.float64)
    assert r.max() < 1.1 and abs(r.mean() - 0.5) < 0.03  # radius t ~ U[0, 1) plus small noise
    assert abs(float(ds.x[:, 2:].std()) - 0.1) < 0.01
    # a linear model cannot separate the arms: the class means sit near the origin
    for c in range(3):
        assert np.hypot(*ds.x[ds.y == c, :2].mean(axis=0)) < 0.25
    assert np.array_equal(data.synthetic_spiral(3000, 4, 3, seed=1).x, ds.x)
    assert not np.array_equal(data.synthetic_spiral(3000, 4, 3, seed=2).x, ds.x)


def test_synthetic_bad_sizes_exit_2(tmp_path, capsys):
    out = str(tmp_path / "s.h5")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "0", "--features", "2",
                    "--classes", "2"], "--n", "positive integer")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "1",
                    "--classes", "2", "--kind", "spiral"], "features >= 2")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "3",
                    "--classes", "1"], "classes >= 2")


# ----------------------------------------------------------------------------- info

def test_info_reports_shapes_dtypes_chunks_filters_scale_and_class_counts(tmp_path, capsys,
                                                                         images_labels):
    _, y, img, lab = images_labels
    out = tmp_path / "d.h5"
    assert main(["data", "import-idx", str(img), str(lab), "--out", str(out),
                 "--chunk-rows", "50"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x: shape (300, 256) uint8, chunks 50x256, gzip level 4 + shuffle" in text
    assert "y: shape (300,) uint8" in text
    assert "attribute scale = 0.0039215686 (1/255)" in text
    counts = np.bincount(y)
    assert "classes: 4; rows per class: " + ", ".join(
        f"{k}: {v}" for k, v in enumerate(counts)) in text
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["datasets"]["x"]["chunks"] == [50, 256]
    assert info["class_counts"] == {str(k): int(v) for k, v in enumerate(counts)}
    assert info["attributes"]["scale"] == 1.0 / 255.0


def test_info_counts_one_hot_targets_by_argmax(tmp_path, capsys):
    y = np.array([2, 0, 2, 1, 2])
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["x"] = np.zeros((5, 2), np.float32)
        f["y"] = np.eye(3)[y]
    assert main(["data", "info", str(tmp_path / "t.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_counts"] == {"0": 1, "1": 1, "2": 3}


def test_info_on_missing_or_non_hdf5_files_exits_2(tmp_path, capsys):
    _fails(capsys, ["data", "info", str(tmp_path / "nope.h5")], "nope.h5", "not found")
    (tmp_path / "t.txt").write_text("hello")
    _fails(capsys, ["data", "info", str(tmp_path / "t.txt")], "t.txt", "not an HDF5 file")
