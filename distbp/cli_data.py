"""`distbp data`: build, generate and describe HDF5 data files.

    distbp data fashion-mnist --out data                 # from Debian's dataset-fashion-mnist
    distbp data fashion-mnist --out data --from ~/idx    # from a directory of IDX files (gz/raw)
    distbp data fashion-mnist --out data --download      # fetch the official files, verify MD5s
    distbp data import-idx train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz --out train.h5
    distbp data synthetic --out bench.h5 --n 100000 --features 784 --classes 10 --seed 0
    distbp data info data/fashion-mnist-train.h5

Files written here hold `x` (N, features) in the source's dtype (uint8 pixels stay uint8), `y`
(N,) labels, the root attribute `scale` (1/255 for uint8 images: the trainer multiplies inputs by
it unless --scale is given) and `source`. They are written to a temporary file in the target
directory and renamed into place, so a reader never sees a half-written file; they get the mode
of any new file (0644 less the umask). Data is streamed in blocks: memory stays bounded by a block
whatever the file's size. Under mpiexec only rank 0 acts: these are one-process jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

from distbp import data
from distbp.errors import EXIT_OK, DataError, UsageError
from distbp.idx import IdxReader

__all__ = ["FASHION_MD5", "FASHION_URL", "DEBIAN_FASHION_DIR", "add_commands", "describe",
           "fashion_mnist", "import_idx", "write_data_file"]

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
                    raise RuntimeError(f"blocks do not add up to {n} rows")
                x[done:done + len(xb)], y[done:done + len(yb)] = xb, yb
                done += len(xb)
            if done != n:
                raise RuntimeError(f"blocks hold {done} rows, expected {n}")
        _fsync(tmp)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp made it 0600: readable like any new file
        _replace(tmp, out)
        _fsync(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _cannot_write(out: Path, err: OSError) -> UsageError:
    return UsageError(f"--out '{out}': cannot write there ({err.strerror or err})")


def _temp_beside(out: Path) -> str:
    """An empty temporary file in out's directory (created if needed), for an atomic rename;
    UsageError (one line, exit 2) when `out` is a directory or its directory is not writable."""
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a directory; give a file name, e.g. "
                         f"'{out / 'data.h5'}'")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as err:
        raise _cannot_write(out, err) from None
    os.close(fd)
    return tmp


def _replace(tmp: str, out: Path) -> None:
    try:
        os.replace(tmp, out)
    except OSError as err:  # e.g. a directory of that name appeared meanwhile
        raise _cannot_write(out, err) from None


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST: {name}.gz (or raw {name}) not found in '{directory}' "
                    f"({how})")


def _download(url: str, dest: Path) -> None:
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' exists and is not a directory")
    if from_dir is not None and download:
        raise UsageError("--from and --download are mutually exclusive")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out '{out}': cannot create the directory "
                         f"({err.strerror or err})") from None
    with contextlib.ExitStack() as stack:
        if from_dir is not None:
            src, how = Path(from_dir), "--from"
            if not src.is_dir():
                raise DataError(f"--from '{src}': not a directory")
        elif download:
            src = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out,
                                                                       prefix=".download-")))
            how = f"downloaded from {url}"
            for name in FASHION_MD5:
                log(f"downloading {url.rstrip('/')}/{name}.gz")
                _download(f"{url.rstrip('/')}/{name}.gz", src / f"{name}.gz")
        elif DEBIAN_FASHION_DIR.is_dir():
            src, how = DEBIAN_FASHION_DIR, "Debian package dataset-fashion-mnist"
        else:
            raise DataError(f"no Fashion-MNIST files: '{DEBIAN_FASHION_DIR}' is absent (apt-get "
                            f"install dataset-fashion-mnist), or give --from DIR of IDX files, "
                            f"or --download")
        return [_build_split(split, src, out, how, log, chunk_rows, compression)
                for split in FASHION_SPLITS]


def _build_split(split: str, src: Path, out: Path, how: str, log, chunk_rows, compression):
    images, labels = (_idx_path(src, name, how) for name in FASHION_SPLITS[split])
    summary = import_idx(images, labels, out / f"fashion-mnist-{split}.h5",
                         source=f"Fashion-MNIST {split} split ({how}; {images.name}, "
                                f"{labels.name})",
                         md5=tuple(FASHION_MD5[n] for n in FASHION_SPLITS[split]),
                         chunk_rows=chunk_rows, compression=compression)
    log(f"wrote {summary['path']}: {summary['rows']} rows x {summary['features']} "
        f"{summary['dtype']}, {summary['classes']} classes (MD5s verified; source: {how})")
    return summary


# ----------------------------------------------------------------------------- info

def _filters(ds: h5py.Dataset) -> str:
    parts = [f"{ds.compression} level {ds.compression_opts}" if ds.compression_opts is not None
             else ds.compression] if ds.compression else []
    parts += ["shuffle"] if ds.shuffle else []
    return " + ".join(parts) or "uncompressed"


def _class_counts(ds: h5py.Dataset) -> dict[int, int] | None:
    """Counts per label (1-D integer y) or per argmax (2-D targets), read in bounded blocks."""
    if ds.dtype.kind not in "iuf" or ds.ndim not in (1, 2) or ds.shape[0] == 0:
        return None
    if ds.ndim == 1 and ds.dtype.kind == "f":
        return None
    counts: dict[int, int] = {}
    step = max(1, (16 << 20) // max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize))
    for lo in range(0, ds.shape[0], step):
        block = ds[lo:lo + step]
        labels = block if ds.ndim == 1 else np.argmax(block, axis=1)
        values, n = np.unique(labels, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    return dict(sorted(counts.items()))


def _attr(v):
    v = v.decode() if isinstance(v, bytes) else v
    return v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) \
        else v


def describe(path: str | Path, y_name: str = "y") -> dict:
    """Datasets (shape, dtype, chunks, filters), attributes and class counts of `y_name`."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"data file {path!r}: not found")
    if not h5py.is_hdf5(path):
        raise DataError(f"data file {path!r}: not an HDF5 file")
    info: dict = {"file": path, "bytes": os.path.getsize(path), "datasets": {}}
    with h5py.File(path, "r", locking=False) as f:
        info["attributes"] = {k: _attr(v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                info["datasets"][name] = {
                    "shape": list(obj.shape), "dtype": str(obj.dtype),
                    "chunks": list(obj.chunks) if obj.chunks else None,
                    "filters": _filters(obj),
                    "attributes": {k: _attr(v) for k, v in obj.attrs.items()}}
        f.visititems(visit)
        if isinstance(f.get(y_name), h5py.Dataset):
            counts = _class_counts(f[y_name])
            if counts is not None:
                info["class_counts"] = {str(k): v for k, v in counts.items()}
    return info


def _print_info(info: dict) -> None:
    print(f"{info['file']}: {info['bytes']:,} bytes")
    for name, d in info["datasets"].items():
        chunks = "x".join(map(str, d["chunks"])) if d["chunks"] else "contiguous"
        print(f"  {name}: shape {tuple(d['shape'])} {d['dtype']}, "
              f"chunks {chunks}, {d['filters']}")
    for k, v in info["attributes"].items():
        shown = f"{v:.8g}" if isinstance(v, float) else json.dumps(v)
        if k == "scale" and isinstance(v, float) and v > 0:
            shown += f" (1/{1 / v:.6g})"
        print(f"  attribute {k} = {shown}")
    if "scale" not in info["attributes"]:
        print("  attribute scale: none (inputs used as stored unless --scale is given)")
    counts = info.get("class_counts")
    if counts is not None:
        print(f"  classes: {len(counts)}; rows per class: "
              + ", ".join(f"{k}: {v}" for k, v in counts.items()))


# ----------------------------------------------------------------------------- the commands

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-rows", type=_positive_int, default=None, metavar="N",
                   help=f"rows per HDF5 chunk (default: about {CHUNK_BYTES >> 10} KiB of rows)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip",
                   help="gzip level 4 + shuffle (default) or none")


def add_commands(sub) -> None:
    """Register `distbp data {import-idx,fashion-mnist,synthetic,info}` on the subparsers."""
    p = sub.add_parser("data", help="build, generate and describe HDF5 data files",
                       description="Build, generate and describe HDF5 data files.",
                       epilog="Bad or corrupt input exits with code 2 and one line naming the "
                              "file and the problem.")
    cmds = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for add in (_add_import, _add_fashion, _add_synthetic, _add_info):
        add(cmds)


def _rank0(job) -> bool:
    return job.rank == 0


def _add_import(cmds) -> None:
    q = cmds.add_parser("import-idx", help="IDX images + labels (gzip or raw) -> HDF5",
                        description="Convert IDX images (N, ...) and labels (N,) to an HDF5 "
                                    "file with x (N, features) and y (N,).")
    q.add_argument("images", help="IDX images file, e.g. train-images-idx3-ubyte.gz")
    q.add_argument("labels", help="IDX labels file, e.g. train-labels-idx1-ubyte.gz")
    q.add_argument("--out", required=True, metavar="FILE.h5")
    _add_write_options(q)
    q.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace, job) -> int:
    if _rank0(job):
        s = import_idx(args.images, args.labels, args.out, chunk_rows=args.chunk_rows,
                       compression=args.compression)
        print(f"wrote {s['path']}: {s['rows']} rows x {s['features']} {s['dtype']}, "
              f"{s['classes']} classes")
    return EXIT_OK


def _add_fashion(cmds) -> None:
    q = cmds.add_parser("fashion-mnist", help="build DIR/fashion-mnist-{train,test}.h5",
                        description="Build DIR/fashion-mnist-train.h5 (60000 rows) and "
                                    "DIR/fashion-mnist-test.h5 (10000 rows) from Debian's "
                                    f"dataset-fashion-mnist ({DEBIAN_FASHION_DIR}), from --from "
                                    "DIR, or by --download; MD5s of the uncompressed IDX "
                                    "streams are verified in every case.")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="directory of the four IDX files (.gz or raw)")
    q.add_argument("--download", action="store_true", help="fetch the four files from --url")
    q.add_argument("--url", metavar="BASE",
                   help=f"base URL for --download (default: {FASHION_URL})")
    _add_write_options(q)
    q.set_defaults(run=_run_fashion)


def _run_fashion(args: argparse.Namespace, job) -> int:
    if args.url is not None and not args.download:
        raise UsageError("--url needs --download")
    if _rank0(job):
        fashion_mnist(args.out, args.from_dir, args.download, args.url or FASHION_URL,
                      chunk_rows=args.chunk_rows, compression=args.compression)
    return EXIT_OK


def _add_synthetic(cmds) -> None:
    q = cmds.add_parser("synthetic", help="a seeded teacher-network or spiral data set",
                        description="Write n seeded rows: 'teacher' (x ~ N(0,1), labels from a "
                                    "fixed random tanh network) or 'spiral' (interleaved arms "
                                    "in the first two features, noise in the rest).")
    q.add_argument("--out", required=True, metavar="FILE.h5")
    q.add_argument("--n", type=_positive_int, required=True, help="rows")
    q.add_argument("--features", type=_positive_int, required=True)
    q.add_argument("--classes", type=_positive_int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--kind", choices=("teacher", "spiral"), default="teacher")
    _add_write_options(q)
    q.set_defaults(run=_run_synthetic)


def _run_synthetic(args: argparse.Namespace, job) -> int:
    if not _rank0(job):
        return EXIT_OK
    shape = (args.kind, args.n, args.features, args.classes, args.seed)
    blocks = data.synthetic_blocks(*shape)  # generated as written: memory is one block
    source = data.synthetic_source(*shape)
    write_data_file(args.out, args.n, (args.features,), np.float32, np.int64, blocks,
                    {"source": source}, args.chunk_rows, args.compression)
    print(f"wrote {args.out}: {source}")
    return EXIT_OK


def _add_info(cmds) -> None:
    q = cmds.add_parser("info", help="shapes, dtypes, chunking, attributes, class counts",
                        description="Describe an HDF5 data file.")
    q.add_argument("file")
    q.add_argument("--y-name", default="y", help="labels dataset for class counts (default y)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace, job) -> int:
    if _rank0(job):
        info = describe(args.file, args.y_name)
        if args.json:
            print(json.dumps(info))
        else:
            _print_info(info)
    return EXIT_OK
