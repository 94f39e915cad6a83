"""IDX reading: exact round trips (Debian's Fashion-MNIST files against their published MD5s and
a plain numpy parse), every dtype of the format, and a clear DataError for each malformed file."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from distbp.errors import DataError
from distbp.idx import IdxReader

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(not DEBIAN.is_dir(),
                                  reason="apt-get install dataset-fashion-mnist (CI installs it)")
# MD5 of the uncompressed streams, from notes/mpi-and-slurm.md section 5 (computed there by hand)
UNCOMPRESSED_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    """An IDX header written out from the specification, independently of distbp.idx."""
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _write(path: Path, payload: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _read_all(path: Path) -> np.ndarray:
    """The whole array of an IDX file, read through IdxReader to the checked end of its stream."""
    with IdxReader(path) as r:
        return np.concatenate(list(r.blocks(1 << 16)))


# ----------------------------------------------------------------------------- Debian's files

@needs_debian
@pytest.mark.parametrize("name", sorted(UNCOMPRESSED_MD5))
def test_debian_file_streams_have_the_published_uncompressed_md5(name):
    path = DEBIAN / f"{name}.gz"
    with gzip.open(path, "rb") as fh:
        assert hashlib.md5(fh.read()).hexdigest() == UNCOMPRESSED_MD5[name]
    with IdxReader(path) as r:
        total = sum(len(b) for b in r.blocks(5000))
        assert r.md5 == UNCOMPRESSED_MD5[name]
    assert total == r.dims[0] == (60000 if name.startswith("train") else 10000)
    assert r.compressed and r.dtype == np.uint8


@needs_debian
def test_debian_files_read_exactly_as_upstreams_numpy_parse():
    # upstream's utils/mnist_reader.py: frombuffer(..., offset=16) for images, 8 for labels
    with gzip.open(DEBIAN / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(10000, 28, 28)
    with gzip.open(DEBIAN / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    got = _read_all(DEBIAN / "t10k-images-idx3-ubyte.gz")
    assert got.shape == (10000, 28, 28) and np.array_equal(got, images)
    got_labels = _read_all(DEBIAN / "train-labels-idx1-ubyte.gz")
    assert np.array_equal(got_labels, labels)
    assert got_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(got_labels).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("code,dtype", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"),
                                        (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")])
@pytest.mark.parametrize("compress", [False, True])
def test_every_idx_type_reads_back_exactly_in_native_byte_order(tmp_path, code, dtype, compress):
    rng = np.random.default_rng(code)
    a = (rng.standard_normal((7, 3, 5)) * 100).astype(dtype)
    path = _write(tmp_path / "a.idx", _header(code, a.shape) + a.tobytes(), compress)
    got = _read_all(path)
    assert got.dtype == np.dtype(dtype).newbyteorder("=") and got.dtype.isnative
    assert np.array_equal(got, a)


def test_blocks_of_any_size_concatenate_to_the_whole_array(tmp_path):
    a = np.arange(11 * 4, dtype=np.uint8).reshape(11, 4)
    raw = _header(0x08, a.shape) + a.tobytes()
    path = _write(tmp_path / "a.gz", raw, compress=True)
    for rows in (1, 3, 11, 100):
        with IdxReader(path) as r:
            blocks = list(r.blocks(rows))
        assert [len(b) for b in blocks] == [min(rows, 11 - lo) for lo in range(0, 11, rows)]
        assert np.array_equal(np.concatenate(blocks), a)
    assert r.md5 == hashlib.md5(raw).hexdigest()


# ----------------------------------------------------------------------------- malformed files

def _error(path: Path) -> str:
    with pytest.raises(DataError) as e:
        _read_all(path)
    message = str(e.value)
    assert "\n" not in message and repr(str(path)) in message
    return message


@pytest.mark.parametrize("magic,why", [
    (b"\x01\x00\x08\x01", "bad magic"),          # first two bytes must be zero
    (b"\x00\x00\x0a\x01", "bad magic"),          # 0x0A is no IDX type code
    (b"\x00\x00\x08\x00", "bad magic"),          # zero dimensions
    (b"\x89PNG", "bad magic"),                   # not IDX at all
])
def test_bad_magic_numbers_are_data_errors(tmp_path, magic, why):
    path = _write(tmp_path / "bad.idx", magic + struct.pack(">I", 1) + b"\x00")
    assert why in _error(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_header_and_truncated_data_are_data_errors(tmp_path, compress):
    full = _header(0x08, (10, 2, 2)) + bytes(40)
    assert "truncated header" in _error(_write(tmp_path / "h", full[:2], compress))
    assert "truncated header" in _error(_write(tmp_path / "d", full[:9], compress))
    message = _error(_write(tmp_path / "t", full[:-1], compress))
    assert "truncated" in message and "(10, 2, 2) (40 data bytes)" in message
    assert "holds 39" in message


def test_bytes_beyond_the_announced_counts_are_data_errors(tmp_path):
    path = _write(tmp_path / "long", _header(0x08, (10,)) + bytes(13))
    assert "3 bytes after the 10 data bytes" in _error(path)


def test_a_cut_gzip_stream_and_a_flipped_gzip_byte_are_data_errors(tmp_path):
    packed = gzip.compress(_header(0x08, (1000,)) + np.arange(1000).astype(np.uint8).tobytes())
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed[:len(packed) // 2])
    assert "corrupt gzip stream" in _error(cut)
    flipped = bytearray(packed)
    flipped[-6] ^= 0xFF  # inside the CRC-32 trailer
    bad = tmp_path / "crc.gz"
    bad.write_bytes(bytes(flipped))
    assert "corrupt gzip stream" in _error(bad)


def test_missing_file_and_directory_are_data_errors(tmp_path):
    assert "not found" in _error(tmp_path / "nope")
    assert "directory" in _error(tmp_path)
