"""`distbp inspect`: show a checkpoint's contents after verifying every SHA-256; `distbp info`:
describe a checkpoint or a data file (HDF5 or NPZ).

    distbp inspect runs/default/checkpoints/ckpt-00001350.h5      # text, one field per line
    distbp inspect ckpt.h5 --json                                 # one JSON line on stdout
    distbp info FILE [--json]       # a checkpoint: as inspect; else as `data info` (HDF5, NPZ)

checkpoint.load verifies the file's and every dataset's SHA-256 (a truncated or corrupt file is
exit 2 with one line); the network is then built from it (distbp.cli_eval.model_from_checkpoint),
so a checkpoint that inspects cleanly also evaluates. Separate from distbp.cli_eval because it
reads no data and runs no collective beyond `agree`: every rank loads, rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py

from distbp import checkpoint, cli_data
from distbp.ckpt_integrity import MAGIC
from distbp.cli import agree
from distbp.cli_eval import COLLECTIVE_TIMEOUT_S, model_from_checkpoint
from distbp.comm import get_comm
from distbp.errors import EXIT_OK, UsageError
from distbp.network import Network

__all__ = ["add_commands"]


def add_commands(sub) -> None:
    """Register `inspect` on the `distbp` subparsers."""
    p = sub.add_parser("inspect", help="show a checkpoint and verify its SHA-256 checksums",
                       description="Print step, epoch, model, preprocessing, optimizer, world "
                       "size, distbp version and run configuration; verify every dataset's SHA-256 "
                       "(exit 2 if the file is truncated or corrupt).")
    p.add_argument("checkpoint", help="checkpoint file (ckpt-<step>.h5)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(run=_run_inspect)
    p = sub.add_parser("info", help="describe a checkpoint (as inspect) or a data file (as "
                       "data info)", description="Describe FILE: a checkpoint (recognised by its "
                       "header) as `distbp inspect` does, any other file as `distbp data info` "
                       "(an HDF5 or NPZ data file).")
    p.add_argument("file", help="a checkpoint, or an HDF5 (.h5) or NPZ (.npz) data file")
    cli_data.add_info_options(p)
    p.set_defaults(run=_run_info)


def _is_checkpoint(path: str) -> bool:
    """Whether the file starts with a checkpoint's header (an unreadable one is not)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False  # `data info` names the problem


def _run_info(args: argparse.Namespace, job) -> int:
    """`distbp info FILE`: inspect a checkpoint, describe anything else as a data file."""
    if Path(args.file).is_dir():
        raise UsageError(_directory_hint(Path(args.file)))
    if _is_checkpoint(args.file):
        return _run_inspect(argparse.Namespace(checkpoint=args.file, json=args.json), job)
    return cli_data.run_info(args, job)


def _directory_hint(path: Path) -> str:
    """The one-line error for `distbp info DIR`: what to give instead, naming the newest
    checkpoint and the plot command when DIR is a run directory (or its checkpoints/)."""
    hints = []
    for ckpt_dir in (path / "checkpoints", path):
        ckpts = checkpoint.list_checkpoints(ckpt_dir)
        if ckpts or (ckpt_dir.name == "checkpoints" and ckpt_dir.is_dir()):
            hints.append(f"`distbp info {ckpts[-1] if ckpts else ckpt_dir / 'ckpt-….h5'}`")
            break
    if (path / "metrics.jsonl").is_file():
        hints.append(f"`distbp plot {path}` for its curves")
    return (f"'{path}' is a directory; give a checkpoint or a data file (HDF5 or NPZ)"
            + (", e.g. " + " or ".join(hints) if hints else ""))


def _verified_count(ckpt: checkpoint.Checkpoint) -> int:
    """Datasets checkpoint.load checked against their SHA-256: W and b per layer, optimizer
    state, /config/json, /rng (seed, epoch, step_in_epoch), preprocessing, /metrics/jsonl and
    the running sums of the train record in progress (/metrics/interval, when present)."""
    return (2 * (len(ckpt.layers) - 1) + len(ckpt.optimizer_state) + 1 + 3
            + len(ckpt.preprocess) + 1 + len(ckpt.interval or {}))


def _inspect_record(ckpt: checkpoint.Checkpoint, net: Network) -> dict:
    """Everything `inspect` prints, as one JSON-ready dict."""
    # informational attribute, not part of load(); no file locking, as load() (NFS/Lustre)
    with h5py.File(ckpt.path, "r", locking=False) as f:
        created = str(f.attrs.get("created", ""))
    vals = [r for r in ckpt.metrics if r.get("kind") == "val"]
    return {"checkpoint": str(ckpt.path), "verified": True,
            "datasets_verified": _verified_count(ckpt), "step": ckpt.step, "epoch": ckpt.epoch,
            "step_in_epoch": ckpt.step_in_epoch, "seed": ckpt.seed, "layers": list(ckpt.layers),
            "activation": ckpt.activation, "output": ckpt.output, "loss": ckpt.loss,
            "dtype": ckpt.dtype, "parameters": int(net.params.size),
            "preprocess": {k: v.item() if v.ndim == 0 else {"shape": list(v.shape)}
                           for k, v in sorted(ckpt.preprocess.items())},
            "optimizer": ckpt.optimizer_name, "optimizer_state": sorted(ckpt.optimizer_state),
            "world_size": ckpt.world_size, "distbp_version": ckpt.distbp_version,
            "created": created, "last_validation": vals[-1] if vals else None,
            "config": ckpt.config}


def _print_inspect(r: dict) -> None:
    prep = ", ".join(f"{k} {v}" if not isinstance(v, dict) else f"{k} {tuple(v['shape'])}"
                     for k, v in r["preprocess"].items()) or "none"
    val = r["last_validation"]
    print(f"checkpoint {r['checkpoint']}: OK, {r['datasets_verified']} datasets verified "
          f"(SHA-256)")
    print(f"step {r['step']}, epoch {r['epoch']} (step {r['step_in_epoch']} of it), "
          f"seed {r['seed']}")
    print(f"model: {'-'.join(map(str, r['layers']))} {r['activation']}/{r['output']}/"
          f"{r['loss']} {r['dtype']}, {r['parameters']:,} parameters")
    print(f"preprocess: {prep}")
    print(f"optimizer: {r['optimizer']} (state: {', '.join(r['optimizer_state']) or 'none'})")
    print(f"written by distbp {r['distbp_version']} on {r['world_size']} rank(s)"
          + (f", {r['created']}" if r["created"] else ""))
    print("last validation: " + (f"step {val.get('step')}, loss {val.get('loss'):.6f}, "
                                 f"accuracy {val.get('accuracy'):.4f}" if val else "none"))
    print("config: " + json.dumps(r["config"], sort_keys=True), flush=True)


def _run_inspect(args: argparse.Namespace, job) -> int:
    comm = get_comm(timeout=COLLECTIVE_TIMEOUT_S)
    job.comm = comm

    def load() -> dict:
        ckpt = checkpoint.load(args.checkpoint)
        return _inspect_record(ckpt, model_from_checkpoint(ckpt))

    record = agree(comm, load)
    if comm.rank == 0:
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            _print_inspect(record)
    return EXIT_OK
