"""HDF5 data files written atomically, and the IDX / Fashion-MNIST importers that fill them.

    import_idx("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "train.h5")
    fashion_mnist("data")                        # data/fashion-mnist-{train,test}.h5, MD5-checked
    write_data_file("s.h5", n, (features,), np.float32, np.int64, blocks, {"source": "..."})

Files written here hold `x` (N, features) in the source's dtype (uint8 pixels stay uint8), `y`
(N,) labels, the root attribute `scale` (1/255 for uint8 images: the trainer multiplies inputs by
it unless --scale is given) and `source`. They are written to a temporary file in the target
directory and renamed into place, so a reader never sees a half-written file; they get the mode
of any new file (0644 less the umask). Data is streamed in blocks: memory stays bounded by a block
whatever the file's size.

This is the library behind `distbp data ...` (no argument parsing, no ranks), usable and
testable on its own. Bad input raises a one-line DataError/UsageError naming the file or option.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from distbp.durable import fsync_path, umask
from distbp.errors import DataError, OutputError, UsageError, one_line
from distbp.idx import IdxReader
from distbp.paths import check_not_input, check_output, check_regular

__all__ = ["BLOCK_BYTES", "CHUNK_BYTES", "DEBIAN_FASHION_DIR", "FASHION_MD5", "FASHION_SPLITS",
           "FASHION_URL", "fashion_mnist", "import_idx", "write_data_file"]

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the UNCOMPRESSED IDX streams: Debian re-gzipped the files (no file name in the gzip
# header), so the .gz MD5s of upstream's README do not match Debian's, while these match both.
FASHION_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
               "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
               "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
               "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}
FASHION_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Random-row reads decompress whole chunks: 1024-row chunks of 784 bytes cost ~20x more per
# shard read than ~16 KiB chunks, while compressing no better.
CHUNK_BYTES = 16 << 10
BLOCK_BYTES = 8 << 20          # rows streamed per write
_DOWNLOAD_TIMEOUT = 60.0


# ----------------------------------------------------------------------------- writing

def _chunk_rows(row_bytes: int, n: int, requested: int | None) -> int:
    """Rows per chunk of x: `requested`, else ~CHUNK_BYTES of whole rows; within [1, n]."""
    rows = requested or max(1, CHUNK_BYTES // max(1, row_bytes))
    return max(1, min(rows, n))


def write_data_file(out: str | Path, n: int, x_row: tuple[int, ...], x_dtype: np.dtype,
                    y_dtype: np.dtype, blocks: Iterator[tuple[np.ndarray, np.ndarray]],
                    attrs: dict, chunk_rows: int | None = None,
                    compression: str = "gzip") -> Path:
    """Write `x` (n, *x_row) and `y` (n,) from (x, y) row blocks, atomically; returns the path.

    x is chunked by rows (~CHUNK_BYTES a chunk unless `chunk_rows`), gzip level 4 + shuffle
    (or uncompressed). The blocks must hold exactly n rows; an exception from the iterator
    (e.g. a checksum that fails after the last block) leaves no file behind.
    """
    out = Path(out)
    tmp = _temp_beside(out)
    row_bytes = math.prod(x_row) * np.dtype(x_dtype).itemsize
    filters = {"compression": "gzip", "compression_opts": 4, "shuffle": True} \
        if compression == "gzip" else {}
    try:
        with h5py.File(tmp, "w") as f:
            x = f.create_dataset("x", (n, *x_row), x_dtype,
                                 chunks=(_chunk_rows(row_bytes, n, chunk_rows), *x_row), **filters)
            y = f.create_dataset("y", (n,), y_dtype, chunks=(min(n, 1 << 16),), **filters)
            f.attrs.update(attrs)
            done = 0
            for xb, yb in blocks:
                if done + len(xb) > n or len(xb) != len(yb):
                    raise ValueError(f"blocks do not add up to {n} rows")
                x[done:done + len(xb)], y[done:done + len(yb)] = xb, yb
                done += len(xb)
            if done != n:
                raise ValueError(f"blocks hold {done} rows, expected {n}")
        # not durable.replace_durably: the chmod sits between the fsync and the rename, and
        # only the rename's OSError is the user's fault (_replace makes it a UsageError)
        fsync_path(tmp)
        os.chmod(tmp, 0o644 & ~umask())  # mkstemp made it 0600: readable like any new file
        _replace(tmp, out)
        fsync_path(out.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, UsageError):
            # a full disk or a file size limit (h5py says RuntimeError for some): one line,
            # and HDF5 is not trusted after it
            raise _cannot_write(out, err, OutputError) from None
        raise
    return out


def _cannot_write(out: Path, err: Exception, kind: type[UsageError] = UsageError
                  ) -> UsageError:
    """The one-line error (of `kind`) for an `--out` that cannot be written."""
    errno = getattr(err, "errno", None)
    why = os.strerror(errno) if errno else one_line(err)  # not HDF5's paragraph
    return kind(f"--out '{out}': cannot write there ({why})")


def _temp_beside(out: Path) -> str:
    """An empty temporary file in out's directory (created if needed), for an atomic rename;
    UsageError (one line, exit 2) when `out` is a directory or its directory is not writable."""
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a directory; give a file name, e.g. "
                         f"'{out / 'data.h5'}'")
    check_output(out, f"--out '{out}'")  # never a FIFO, device, symlink or shared directory
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as err:
        raise _cannot_write(out, err) from None
    os.close(fd)
    return tmp


def _replace(tmp: str, out: Path) -> None:
    """Rename the finished temporary file onto `out` (atomic on one file system)."""
    try:
        os.replace(tmp, out)
    except OSError as err:  # e.g. a directory of that name appeared meanwhile
        raise _cannot_write(out, err) from None




# ----------------------------------------------------------------------------- IDX import

def _read_labels(path: str | Path, md5: str | None) -> np.ndarray:
    """The whole labels file (1-D integers, small), checked against `md5` when given."""
    with IdxReader(path) as r:
        if len(r.dims) != 1 or r.dtype.kind not in "iu":
            raise DataError(f"IDX file {str(path)!r}: labels must be 1-D integers, got dims "
                            f"{r.dims} of {r.dtype} (images and labels swapped?)")
        y = np.concatenate(list(r.blocks(1 << 20)) or [np.empty(0, r.dtype)])
    _check_md5(r, md5)
    return y


def _check_md5(r: IdxReader, expected: str | None) -> None:
    if expected is not None and r.md5 != expected:
        raise DataError(f"IDX file {r.path!r}: MD5 of the uncompressed data is {r.md5}, "
                        f"expected {expected}: corrupt or not the official file")


def import_idx(images: str | Path, labels: str | Path, out: str | Path, source: str = "",
               md5: tuple[str, str] | None = None, chunk_rows: int | None = None,
               compression: str = "gzip") -> dict:
    """IDX images (N, ...) and labels (N,) -> HDF5 `out` with x (N, prod(...)); returns a summary.

    With `md5` = (images, labels), the uncompressed streams must have these MD5s. Raises
    DataError on any malformed input; no output file exists then.
    """
    for what, path in (("images", images), ("labels", labels)):  # a FIFO would block forever
        check_regular(path, f"IDX {what} file '{path}'", DataError)
    check_not_input(out, (("IDX images file", images), ("IDX labels file", labels)),
                    f"--out '{out}'", DataError)
    y = _read_labels(labels, md5[1] if md5 else None)
    with IdxReader(images) as r:
        if len(r.dims) < 2:
            raise DataError(f"IDX file {r.path!r}: images must have at least 2 dimensions "
                            f"(items, ...), got dims {r.dims} (images and labels swapped?)")
        if r.dims[0] != len(y):
            raise DataError(f"IDX files {r.path!r} and {str(labels)!r}: {r.dims[0]} images but "
                            f"{len(y)} labels")
        if not len(y):
            raise DataError(f"IDX file {r.path!r}: no items (dims {r.dims})")
        features = math.prod(r.dims[1:])
        attrs = {"source": source or f"IDX import of {r.path} and {labels}",
                 "image_shape": np.asarray(r.dims[1:], np.int64)}
        if r.dtype == np.uint8:
            attrs["scale"] = 1.0 / 255.0

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            lo = 0
            for xb in r.blocks(max(1, BLOCK_BYTES // r.item_size)):
                yield xb.reshape(len(xb), features), y[lo:lo + len(xb)]
                lo += len(xb)
            _check_md5(r, md5[0] if md5 else None)  # before the file is renamed into place

        write_data_file(out, len(y), (features,), r.dtype, y.dtype, blocks(), attrs,
                        chunk_rows, compression)
    counts = np.bincount(y.astype(np.int64) - min(0, int(y.min())))
    return {"path": str(out), "rows": len(y), "features": features, "dtype": str(r.dtype),
            "classes": int(np.count_nonzero(counts))}


# ----------------------------------------------------------------------------- Fashion-MNIST

def _idx_path(directory: Path, name: str, how: str) -> Path:
    """directory/name.gz, else the raw directory/name; DataError naming both when neither."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST: {name}.gz (or raw {name}) not found in '{directory}' "
                    f"({how})")


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest`; any network or HTTP failure is a one-line DataError."""
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT) as resp, \
                open(dest, "wb") as fh:
            shutil.copyfileobj(resp, fh, 1 << 20)
    except urllib.error.HTTPError as err:
        raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"download of {url} failed: {reason}") from None


def fashion_mnist(out: str | Path, from_dir: str | Path | None = None, download: bool = False,
                  url: str = FASHION_URL, log: Callable[[str], None] = print,
                  chunk_rows: int | None = None, compression: str = "gzip") -> list[dict]:
    """Build out/fashion-mnist-{train,test}.h5, verified by the MD5s of the uncompressed IDX.

    Sources, first that applies: `from_dir`; a download from `url` (into a temporary directory
    under `out`, removed afterwards); Debian's dataset-fashion-mnist files.
    """
    out = _output_dir(out, from_dir, download)
    with contextlib.ExitStack() as stack:  # holds a download's temporary directory
        src, how = _fashion_source(stack, out, from_dir, download, url, log)
        return [_build_split(split, src, out, how, log, chunk_rows, compression)
                for split in FASHION_SPLITS]


def _output_dir(out: str | Path, from_dir: str | Path | None, download: bool) -> Path:
    """`out` as a directory, created if needed; UsageError for a file there, for --from with
    --download, or when it cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' exists and is not a directory")
    if from_dir is not None and download:
        raise UsageError("--from and --download are mutually exclusive")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out '{out}': cannot create the directory "
                         f"({err.strerror or one_line(err)})") from None
    return out


def _fashion_source(stack: contextlib.ExitStack, out: Path, from_dir: str | Path | None,
                    download: bool, url: str, log: Callable[[str], None]) -> tuple[Path, str]:
    """(directory holding the four IDX files, how they were found, for messages): `from_dir`,
    else a download into a temporary directory under `out` (removed when `stack` closes), else
    Debian's; DataError when none applies."""
    if from_dir is not None:
        src = Path(from_dir)
        if not src.is_dir():
            raise DataError(f"--from '{src}': not a directory")
        return src, "--from"
    if download:
        src = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out,
                                                                   prefix=".download-")))
        for name in FASHION_MD5:
            log(f"downloading {url.rstrip('/')}/{name}.gz")
            _download(f"{url.rstrip('/')}/{name}.gz", src / f"{name}.gz")
        return src, f"downloaded from {url}"
    if DEBIAN_FASHION_DIR.is_dir():
        return DEBIAN_FASHION_DIR, "Debian package dataset-fashion-mnist"
    raise DataError(f"no Fashion-MNIST files: '{DEBIAN_FASHION_DIR}' is absent (apt-get "
                    f"install dataset-fashion-mnist), or give --from DIR of IDX files, "
                    f"or --download")


def _build_split(split: str, src: Path, out: Path, how: str, log: Callable[[str], None],
                 chunk_rows: int | None, compression: str) -> dict:
    """out/fashion-mnist-`split`.h5 from the split's two IDX files in `src`, MD5-checked."""
    images, labels = (_idx_path(src, name, how) for name in FASHION_SPLITS[split])
    summary = import_idx(images, labels, out / f"fashion-mnist-{split}.h5",
                         source=f"Fashion-MNIST {split} split ({how}; {images.name}, "
                                f"{labels.name})",
                         md5=tuple(FASHION_MD5[n] for n in FASHION_SPLITS[split]),
                         chunk_rows=chunk_rows, compression=compression)
    log(f"wrote {summary['path']}: {summary['rows']} rows x {summary['features']} "
        f"{summary['dtype']}, {summary['classes']} classes (MD5s verified; source: {how})")
    return summary


