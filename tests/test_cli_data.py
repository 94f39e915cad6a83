"""`distbp data import-idx | synthetic | info`: exact HDF5 contents, the layout promised (uint8
kept, chunked by rows, gzip + shuffle, scale attribute), atomic writes, `info` of HDF5 and NPZ
files, and exit 2 with one line naming the file for every malformed input."""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import error_lines, run_py

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
    err = "\n".join(error_lines(capsys.readouterr().err))
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
                    "--classes", "2"], "--n", "must be an integer from 1 to")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "1",
                    "--classes", "2", "--kind", "spiral"], "features >= 2")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "3",
                    "--classes", "1"], "classes >= 2")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", str(2**40),
                    "--classes", "2"], "--features", "from 1 to 1048576")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "3",
                    "--classes", str(2**40)], "--classes", "from 1 to 65536")
    _fails(capsys, ["data", "synthetic", "--out", out, "--n", str(2**50), "--features", "3",
                    "--classes", "2"], "MiB, more than the", "free there")
    for seed in ("-1", str(2**63)):
        _fails(capsys, ["data", "synthetic", "--out", out, "--n", "5", "--features", "3",
                        "--classes", "2", "--seed", seed], "--seed", "from 0 to")
    assert not Path(out).exists()


def _synthetic_file(tmp_path: Path, name: str, kind: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["data", "synthetic", "--out", str(out), "--n", "5000", "--features", "6",
                 "--classes", "3", "--seed", "9", "--kind", kind, *extra]) == 0
    return out


@pytest.mark.parametrize("kind", ["teacher", "spiral"])
def test_synthetic_rows_do_not_depend_on_the_block_size_they_are_made_in(tmp_path, monkeypatch,
                                                                        capsys, kind):
    whole = _synthetic_file(tmp_path, "whole.h5", kind)     # default: one block of 5000 rows
    sizes, made = [], data.synthetic_blocks

    def recorded(*args, **kwargs):
        for xb, yb in made(*args, **kwargs):
            sizes.append(len(xb))
            yield xb, yb

    monkeypatch.setattr(data, "synthetic_blocks", recorded)
    monkeypatch.setattr(data.synthetic, "SYNTHETIC_BLOCK_BYTES", 100 * 6 * 4)  # 100 x rows a block
    blocks = _synthetic_file(tmp_path, "blocks.h5", kind)
    assert len(sizes) > 1 and max(sizes) <= 1024 and sum(sizes) == 5000   # teacher: whole 1024s
    with h5py.File(whole) as a, h5py.File(blocks) as b:
        assert np.array_equal(a["x"][...], b["x"][...])
        assert np.array_equal(a["y"][...], b["y"][...])


CAPPED = """
import os, resource, sys
import h5py, numpy
from distbp import cli, data   # all the command imports, before the cap

margin = int(sys.argv[1])
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (vm + margin, vm + margin))
sys.exit(cli.main(sys.argv[2:]))
"""


def test_synthetic_data_larger_than_a_memory_cap_is_generated_block_by_block(tmp_path):
    # RLIMIT_AS caps the process at (its VM after the imports) + 96 MiB; x takes 3x that.
    margin, n, features = 96 << 20, 75_000, 1024
    assert n * features * 4 > 3 * margin
    (tmp_path / "capped.py").write_text(CAPPED)
    out = tmp_path / "big.h5"
    try:
        done = run_py([str(tmp_path / "capped.py"), str(margin), "data", "synthetic", "--out",
                       str(out), "--n", str(n), "--features", str(features), "--classes", "10",
                       "--compression", "none"], timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        with h5py.File(out) as f:
            assert f["x"].shape == (n, features) and f["y"].shape == (n,)
            first = data.synthetic_teacher(2048, features, 10, seed=0)   # a prefix: the same
            assert np.array_equal(f["x"][:2048], first.x)
            assert np.array_equal(f["y"][:2048], first.y)
    finally:
        out.unlink(missing_ok=True)              # pytest keeps old tmp dirs: free the disk


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_data_files_get_the_mode_of_a_new_file_not_mkstemps_0600(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        out = _synthetic_file(tmp_path, "s.h5", "spiral")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 & ~umask   # 0644 or 0640


def test_out_that_is_a_directory_or_cannot_be_written_exits_2_with_one_line(tmp_path, capsys,
                                                                           images_labels):
    _, _, img, lab = images_labels
    (tmp_path / "d.h5").mkdir()
    (tmp_path / "plain").write_text("a file, not a directory")
    synth = ["data", "synthetic", "--n", "10", "--features", "3", "--classes", "2", "--out"]
    _fails(capsys, synth + [str(tmp_path / "d.h5")], f"--out '{tmp_path / 'd.h5'}' is a "
                                                    f"directory; give a file name")
    _fails(capsys, ["data", "import-idx", str(img), str(lab), "--out", str(tmp_path / "d.h5")],
           "is a directory")
    under_file = tmp_path / "plain" / "s.h5"
    _fails(capsys, synth + [str(under_file)], f"--out '{under_file}': cannot write there")
    _fails(capsys, ["data", "fashion-mnist", "--from", str(tmp_path), "--out",
                    str(tmp_path / "plain" / "dir")], "cannot create the directory")
    if os.geteuid() != 0:                        # root writes into a mode 0555 directory
        (tmp_path / "ro").mkdir(mode=0o555)
        _fails(capsys, synth + [str(tmp_path / "ro" / "s.h5")], "cannot write there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "img.gz", "lab", "plain"] + (
        [] if os.geteuid() == 0 else ["ro"])
    assert list((tmp_path / "d.h5").iterdir()) == []


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
    _fails(capsys, ["data", "info", str(tmp_path / "t.txt")], "t.txt", "not an HDF5 or NPZ file")
    _fails(capsys, ["data", "info", str(tmp_path)], f"data file '{tmp_path}': is a directory")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    _fails(capsys, ["data", "info", str(tmp_path / "t.npz")], "t.npz", "not a valid NPZ archive")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_info_describes_npz_arrays_and_class_counts_as_for_hdf5(tmp_path, capsys, save):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 3, 2)).astype(np.float32), rng.integers(0, 5, 40)
    save(tmp_path / "d.npz", x=x, y=y, extra=np.arange(3, dtype=np.uint8))
    assert main(["data", "info", str(tmp_path / "d.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    zipped = "zip deflate" if save is np.savez_compressed else "uncompressed"
    assert info["format"] == "npz" and info["attributes"] == {}
    assert {k: (d["shape"], d["dtype"], d["filters"]) for k, d in info["datasets"].items()} == {
        "x": ([40, 3, 2], "float32", zipped), "y": ([40], "int64", zipped),
        "extra": ([3], "uint8", zipped)}
    assert info["class_counts"] == {str(k): int(n) for k, n in enumerate(np.bincount(y)) if n}
    assert main(["data", "info", str(tmp_path / "d.npz")]) == 0
    text = capsys.readouterr().out
    assert f"x: shape (40, 3, 2) float32, {zipped}" in text and "classes: " in text
