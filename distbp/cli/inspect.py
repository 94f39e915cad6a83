"""`distbp inspect`: show a checkpoint's contents after verifying every SHA-256.

    distbp inspect runs/default/checkpoints/ckpt-00001350.h5      # text, one field per line
    distbp inspect ckpt.h5 --json                                 # one JSON line on stdout

checkpoint.load verifies the file's and every dataset's SHA-256 (a truncated or corrupt file is
exit 2 with one line); the network is then built from it
(distbp.evaluation.network_from_checkpoint), so a checkpoint that inspects cleanly also
evaluates. Every rank loads (through agreement), rank 0 prints.
"""

from __future__ import annotations

import argparse
import json

import h5py

from distbp import checkpoint
from distbp.config_schema import DEFAULT_COLLECTIVE_TIMEOUT_S
from distbp.errors import EXIT_OK
from distbp.evaluation import network_from_checkpoint
from distbp.launch import agree
from distbp.network import Network

__all__ = ["add_command", "run"]


def add_command(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint and verify its SHA-256 checksums",
                       description="Print step, epoch, model, preprocessing, optimizer, world "
                       "size, distbp version and run configuration; verify every dataset's SHA-256 "
                       "(exit 2 if the file is truncated or corrupt).")
    p.add_argument("checkpoint", help="checkpoint file (ckpt-<step>.h5)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(run=run)


def _verified_count(ckpt: checkpoint.Checkpoint) -> int:
    """Datasets checkpoint.load checked against their SHA-256: W and b per layer, optimizer
    state, /config/json, /rng (seed, epoch, step_in_epoch), preprocessing, /metrics/jsonl and
    the running sums of the train record in progress (/metrics/interval)."""
    return (2 * (len(ckpt.layers) - 1) + len(ckpt.optimizer_state) + 1 + 3
            + len(ckpt.preprocess) + 1 + len(ckpt.interval))


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


def run(args: argparse.Namespace, job) -> int:
    comm = job.start(timeout=DEFAULT_COLLECTIVE_TIMEOUT_S)

    def load() -> dict:
        ckpt = checkpoint.load(args.checkpoint)
        return _inspect_record(ckpt, network_from_checkpoint(ckpt))

    record = agree(comm, load)
    if comm.rank == 0:
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            _print_inspect(record)
    return EXIT_OK
