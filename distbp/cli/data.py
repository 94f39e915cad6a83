"""`distbp data`: build and generate HDF5 data files; describe HDF5 and NPZ data files.

    distbp data fashion-mnist --out data                 # from Debian's dataset-fashion-mnist
    distbp data fashion-mnist --out data --from ~/idx    # from a directory of IDX files (gz/raw)
    distbp data fashion-mnist --out data --download      # fetch the official files, verify MD5s
    distbp data import-idx train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz --out train.h5
    distbp data synthetic --out bench.h5 --n 100000 --features 784 --classes 10 --seed 0
    distbp data info data/fashion-mnist-train.h5         # or an .npz archive, as training takes

The files are written by distbp.data_import (layout, atomic writes, streaming) and described by
distbp.data.describe. Under mpiexec only rank 0 acts: these are one-process jobs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from distbp import data
from distbp.cli.args import int_range, positive_int, seed_int
from distbp.config_schema import MAX_ROWS
from distbp.data.describe import describe
from distbp.data_import import (
    CHUNK_BYTES,
    DEBIAN_FASHION_DIR,
    FASHION_URL,
    fashion_mnist,
    import_idx,
    write_data_file,
)
from distbp.errors import EXIT_OK, UsageError

__all__ = ["add_command", "add_info_options", "run_info"]

MAX_FEATURES, MAX_CLASSES = 1 << 20, 1 << 16  # synthetic data: what its generator can serve


def _print_info(info: dict) -> None:
    print(f"{info['file']}: {info['bytes']:,} bytes, {info['format'].upper()}")
    for name, d in info["datasets"].items():
        chunks = "x".join(map(str, d["chunks"])) if d["chunks"] else "contiguous"
        layout = f"chunks {chunks}, " if info["format"] == "hdf5" else ""
        print(f"  {name}: shape {tuple(d['shape'])} {d['dtype']}, {layout}{d['filters']}")
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


def _add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-rows", type=positive_int, default=None, metavar="N",
                   help=f"rows per HDF5 chunk (default: about {CHUNK_BYTES >> 10} KiB of rows)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip",
                   help="gzip level 4 + shuffle (default) or none")


def add_command(sub) -> None:
    """Register `distbp data {import-idx,fashion-mnist,synthetic,info}` on the subparsers."""
    p = sub.add_parser("data", help="build, generate and describe data files",
                       description="Build and generate HDF5 data files; describe HDF5 and NPZ "
                       "data files.",
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
    q.add_argument("--n", type=int_range(1, MAX_ROWS), required=True, help="rows")
    q.add_argument("--features", type=int_range(1, MAX_FEATURES), required=True,
                   help=f"1 to {MAX_FEATURES}")
    q.add_argument("--classes", type=int_range(1, MAX_CLASSES), required=True,
                   help=f"1 to {MAX_CLASSES}")
    q.add_argument("--seed", type=seed_int, default=0, help="0 to 2**63 - 1 (default 0)")
    q.add_argument("--kind", choices=("teacher", "spiral"), default="teacher")
    _add_write_options(q)
    q.set_defaults(run=_run_synthetic)


def _run_synthetic(args: argparse.Namespace, job) -> int:
    if not _rank0(job):
        return EXIT_OK
    need = args.n * (4 * args.features + 8)  # float32 x and int64 y, before compression
    there = Path(args.out).absolute().parent
    while not there.is_dir() and there != there.parent:  # the directory --out will be made in
        there = there.parent
    free = shutil.disk_usage(there).free
    if need > free:
        raise UsageError(f"--out '{args.out}': {args.n} rows of {args.features} features need "
                         f"about {need / 2**20:,.1f} MiB, more than the {free / 2**20:,.1f} MiB "
                         f"free there")
    shape = (args.kind, args.n, args.features, args.classes, args.seed)
    blocks = data.synthetic_blocks(*shape)  # generated as written: memory is one block
    source = data.synthetic_source(*shape)
    write_data_file(args.out, args.n, (args.features,), np.float32, np.int64, blocks,
                    {"source": source}, args.chunk_rows, args.compression)
    print(f"wrote {args.out}: {source}")
    return EXIT_OK


def _add_info(cmds) -> None:
    q = cmds.add_parser("info", help="shapes, dtypes, chunking, attributes, class counts",
                        description="Describe a data file: HDF5 (datasets, chunking, filters, "
                        "attributes) or NPZ (arrays, zip compression), with class counts.")
    q.add_argument("file", help="an HDF5 (.h5/.hdf5/.hdf) or NPZ (.npz) data file")
    add_info_options(q)
    q.set_defaults(run=run_info)


def add_info_options(q: argparse.ArgumentParser) -> None:
    """--y-name and --json, which run_info reads (also `distbp info`'s)."""
    q.add_argument("--y-name", default="y", help="data file: labels dataset or array for class "
                   "counts (default y)")
    q.add_argument("--json", action="store_true", help="print one JSON object")


def run_info(args: argparse.Namespace, job) -> int:
    """`distbp data info FILE` (also `distbp info` for a file that is not a checkpoint)."""
    if _rank0(job):
        info = describe(args.file, args.y_name)
        if args.json:
            print(json.dumps(info))
        else:
            _print_info(info)
    return EXIT_OK
