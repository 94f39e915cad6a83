"""distbp from Python: `fit`, `load`, `evaluate`, `predict`. The same script runs as one process
(`python my_script.py`) and data-parallel (`mpiexec -n 4 python my_script.py`).

    import distbp
    result = distbp.fit([64, 128, 10], x, y, epochs=5, batch_size=256, lr=0.05, run_dir="runs/a")
    net = distbp.load(result.checkpoint)           # the model and its preprocessing
    distbp.evaluate(net, x_test, y_test)           # {"loss": ..., "accuracy": ..., "samples": ...}
    distbp.predict(net, x_new)                     # output activations (N, n_out), every rank

Every rank passes the same full arrays; the batch plan shards them exactly as it shards a file.
`fit` and `distbp train` are one code path (`train`): the same run directory, metrics,
checkpoints, resume, preemption (SIGTERM/SIGUSR1/SIGINT: a checkpoint, then `exit_code` 75) and
validation. Errors: bad input found by `fit` raises distbp.errors.SetupRefused (a UsageError) on
every rank, its message on the rank that found it; `evaluate`/`predict` raise a UsageError
(ConfigError, DataError). A failure that leaves the ranks apart (a dead peer, an exception on
one rank) prints the error and aborts the whole job, as `distbp train` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distbp import checkpoint, data, preprocess
from distbp.comm import host_names
from distbp.config import resolve_options
from distbp.config_schema import DEFAULT_COLLECTIVE_TIMEOUT_S, TrainConfig
from distbp.errors import ConfigError, NonFiniteError, SetupRefused
from distbp.evaluation import batch_share, loss_sums, network_from_checkpoint, predict_rows
from distbp.launch import Job, agree, exit_code, ranks_may_diverge, set_threads, setup_timeout
from distbp.network import Network
from distbp.session import (
    ARRAYS_LABEL,
    Session,
    build_session,
    claim_outputs,
    release_outputs,
    stored_config,
)
from distbp.stopflag import StopFlag, catch_stop_signals, restore_signals
from distbp.trainer import Trainer
from distbp.version import __version__

__all__ = ["FitResult", "evaluate", "fit", "load", "predict", "train"]


@dataclass
class FitResult:
    """What `fit` returns on every rank: the trained network (with its preprocessing), the
    metrics records (as metrics.jsonl holds them), the newest checkpoint and the exit code that
    `distbp train` would give (0 done, 75 preempted: run again with resume="auto")."""

    network: Network
    records: list[dict]
    checkpoint: Path | None
    exit_code: int

    @property
    def preempted(self) -> bool:
        return self.exit_code == 75


def fit(model: Network | Sequence[int] | None = None, x=None, y=None, *, x_val=None, y_val=None,
        **options) -> FitResult:
    """Train `model` (a Network, trained in place from its current parameters, or layer widths,
    or None: derived from the data) on arrays x (N, n_in), y (N,) labels or (N, n_out) targets,
    or on the files named by `data=` / `val_data=`; `options` are `distbp train`'s TOML keys
    (lr, batch_size, epochs, run_dir, resume, ...) with their defaults."""
    job = Job()
    stop = catch_stop_signals()
    try:
        comm = job.start(timeout=setup_timeout(options.get("collective_timeout")))
        cfg, datasets = agree(comm, lambda: _fit_config(model, x, y, x_val, y_val, options))
        return train(cfg, job, stop, datasets=datasets,
                     network=model if isinstance(model, Network) else None)
    except BaseException as e:
        if ranks_may_diverge(job) and not isinstance(e, (SetupRefused, NonFiniteError)):
            exit_code(job, e)  # prints the error and aborts every rank (MPI_Abort)
        raise
    finally:
        restore_signals(stop)
        job.end()


def _fit_config(model, x, y, x_val, y_val, options: dict) -> tuple[TrainConfig, tuple | None]:
    """The validated configuration of a `fit` call (as `distbp train` resolves its options:
    defaults < preset < config file < the keywords; without data, the bundled digits and their
    preset) and the in-memory datasets, or None."""
    options = dict(options)
    if isinstance(model, Network):
        for key, value in (("layers", list(model.layers)), ("activation", model.activation),
                           ("output", model.output), ("loss", model.loss),
                           ("dtype", str(model.dtype))):
            if options.setdefault(key, value) != value:
                raise ConfigError(f"fit: {key}={options[key]!r} contradicts the network's "
                                  f"{value!r}")
    elif model is not None:
        options["layers"] = [int(n) for n in model]
    if (x is None) != (y is None) or (x_val is None) != (y_val is None):
        raise ConfigError("fit: give x with y, and x_val with y_val")
    if x is None:
        if x_val is not None:
            raise ConfigError("fit: x_val, y_val need training arrays x, y")
        return resolve_options(options), None
    if "data" in options:
        raise ConfigError("fit: give either arrays x, y or data='file', not both")
    train = data.ArrayDataset(x, y, source="arrays x, y")
    options["data"] = _arrays_label(train)
    val = None
    if x_val is not None:
        val = data.ArrayDataset(x_val, y_val, source="arrays x_val, y_val")
        options["val_data"] = _arrays_label(val)
    return resolve_options(options), (train, val)


def _arrays_label(ds: data.ArrayDataset) -> str:
    """How a run's configuration names in-memory data: by a digest of the rows, so a resume
    with other arrays is refused like a resume with another file."""
    h = hashlib.sha256()
    for a in (ds.x, ds.y):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return f"{ARRAYS_LABEL}{h.hexdigest()[:16]}>"


def train(cfg: TrainConfig, job: Job, stop: StopFlag, datasets: tuple | None = None,
          network: Network | None = None) -> FitResult:
    """The run behind `distbp train` and `fit`: build the session on every rank (bad input
    stops all through `agree`), print the start report on rank 0, train, share the records."""
    comm = job.comm
    comm.set_timeout(cfg.collective_timeout)  # the file may have set it
    job.threads = set_threads(cfg.threads, comm.local_size,  # and --threads / threads =
                              cfg.reproducible)
    s = agree(comm, lambda: _session(cfg, comm, datasets))
    _agree_on_start(comm, s)
    agree(comm, lambda: claim_outputs(s, comm.rank))  # rank 0 locks its outputs
    if network is not None:  # train the caller's network, from rank 0's initial values
        if s.resumed_from is None:
            np.copyto(s.net.params, network.params)
            comm.bcast(s.net.params, root=0)
    hosts = host_names(comm)  # every rank: one small gather
    if comm.rank == 0:
        print("\n".join(start_report(s, comm, job.threads, hosts)), flush=True)
    trainer = Trainer(s, comm, stop=stop)
    try:
        code = trainer.train()
    finally:
        release_outputs(s)
    if network is not None:
        np.copyto(network.params, s.net.params)
        network.preprocess = dict(s.preprocess)
    records = _share_records(comm, trainer.records() if comm.rank == 0 else None)
    return FitResult(network or s.net, records, trainer.last_checkpoint, code)


def _session(cfg: TrainConfig, comm, datasets: tuple | None) -> Session:
    """build_session on this rank (rank 0, which writes them, checks the outputs)."""
    return build_session(cfg, local_size=comm.local_size, rank=comm.rank, size=comm.size,
                         datasets=datasets)


def _agree_on_start(comm, s: Session) -> None:
    """Every rank must run the same configuration (fit: the same arrays, by digest; a Horovod
    habit is to pass each rank its own part) and resume from the same step (nodes that list a
    checkpoint directory differently, a stale NFS cache, would otherwise train apart)."""
    span = np.array([s.start_step, -s.start_step], np.int64)
    comm.allreduce_max(span)  # [latest start, −earliest start]
    if span[0] != -span[1]:
        raise SetupRefused(f"ranks found different checkpoints to resume from (steps {-span[1]} "
                           f"to {span[0]}): --checkpoint-dir must be the same shared directory "
                           f"on every node", carrier=comm.rank == 0)
    text = json.dumps(stored_config(s.cfg), sort_keys=True).encode()
    digest = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True) >> 1
    same = np.array([digest, -digest], np.int64)
    comm.allreduce_max(same)  # [max, −min]: equal when every rank has the same digest
    if same[0] != -same[1]:
        raise SetupRefused("ranks were given different settings or data: every rank must pass "
                           "the same options and the same full arrays (fit shards the rows "
                           "itself)", carrier=comm.rank == 0)


def start_report(s: Session, comm, threads: str, hosts: Sequence[str] = ()) -> list[str]:
    """Rank 0's lines at the start of a run: ranks, where they run (`hosts`: each rank's host
    name, by rank), data, model, batch split, config, resume."""
    cfg, net = s.cfg, s.net
    lines = [
        f"distbp {__version__}: {comm.size} rank(s), {comm.name}; {threads}",
        *([placement(hosts)] if hosts else []),
        f"data: {s.train.source} ({s.train.n} rows, {s.train.n_features} features)"
        + (f"; validation: {s.val.source} ({s.val.n} rows)" if s.val is not None else ""),
        f"model: {'-'.join(map(str, net.layers))} {net.activation}/{net.output}/{net.loss} "
        f"{net.dtype}, {net.params.size:,} parameters; optimizer {s.optimizer.name}",
        f"global batch {cfg.batch_size} -> {_batch_split(cfg, comm.size)}; "
        f"{s.steps_per_epoch} steps per epoch; steps {s.start_step} -> {s.total_steps}",
        "config: " + json.dumps(cfg.to_dict(), sort_keys=True)]
    if s.resumed_from is not None:
        lines.append(f"resumed from {s.resumed_from} at step {s.start_step}")
    return lines + s.notes


def _batch_split(cfg, size: int) -> str:
    """'per-rank shard 32 rows', '4 micro-batches of 16 rows, 2 per rank (reproducible)'."""
    def spread(count: int, parts: int) -> str:
        return "..".join(map(str, sorted({b - a for a, b in (data.shard_bounds(count, r, parts)
                                                             for r in range(parts))})))
    if cfg.reproducible:
        return (f"{cfg.micro_batches} micro-batches of {spread(cfg.batch_size, cfg.micro_batches)}"
                f" rows, {spread(cfg.micro_batches, size)} per rank (reproducible)")
    pieces = f" in {cfg.accumulate} pieces" if cfg.accumulate > 1 else ""
    return f"per-rank shard {spread(cfg.batch_size, size)} rows{pieces}"


def placement(hosts: Sequence[str]) -> str:
    """'hosts: node1 ranks 0-1, node2 ranks 2-3': which ranks run on which host (by rank)."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return f"hosts: {len(ranks)}: " + ", ".join(
        f"{host} rank{'s' if len(r) > 1 else ''} {_spans(r)}" for host, r in ranks.items())


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None]):
        if cur != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ",".join(out)


def _share_records(comm, records: list[dict] | None) -> list[dict]:
    """Rank 0's metrics records on every rank (as JSON text: one length, one byte buffer)."""
    text = json.dumps(records).encode() if comm.rank == 0 else b""
    length = np.array([len(text)], np.int64)
    comm.bcast(length, root=0)
    buf = np.frombuffer(text, np.uint8).copy() if comm.rank == 0 else np.empty(length[0], np.uint8)
    comm.bcast(buf, root=0)
    return json.loads(buf.tobytes().decode())


def load(path: str | Path) -> Network:
    """The network stored in a checkpoint, verified (SHA-256), with its training preprocessing
    in `.preprocess` (applied by `evaluate` and `predict`; `Network.predict` does not)."""
    ckpt = checkpoint.load(path)
    net = network_from_checkpoint(ckpt)
    net.preprocess = dict(ckpt.preprocess)
    return net


def evaluate(net: Network, x, y, batch_size: int = 256) -> dict:
    """Mean loss and accuracy of `net` on arrays x, y (with `net.preprocess`): each rank takes
    whole batches of the rows, summed in a fixed order; the same dict on every rank, with the
    same bits on any number of ranks at one BLAS thread count."""
    ds, batch = _arrays(net, x, y), _batch(batch_size)
    with _job() as comm:
        sums = loss_sums(net, ds, _inputs(net), batch, comm)
    n = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n,
            "samples": int(sums[2])}


def predict(net: Network, x, batch_size: int = 256) -> np.ndarray:
    """Output activations (N, n_out) of `net` on array x (with `net.preprocess`), computed in
    shares across the ranks and gathered: the whole array on every rank."""
    ds, batch = _arrays(net, x, None), _batch(batch_size)
    out = np.empty((ds.n, net.n_outputs), net.dtype)
    with _job() as comm:
        shares = [batch_share(ds.n, batch, r, comm.size) for r in range(comm.size)]
        lo, hi = shares[comm.rank]
        mine = np.empty((hi - lo, net.n_outputs), net.dtype)
        predict_rows(net, ds, _inputs(net), lo, hi, batch, mine)
        comm.gather(mine, out, [b - a for a, b in shares], root=None)
    return out


@contextmanager
def _job():
    """The communicator of one evaluate/predict call; BLAS threads given back at the end."""
    job = Job()
    try:
        yield job.start(timeout=DEFAULT_COLLECTIVE_TIMEOUT_S)
    finally:
        job.end()


def _arrays(net: Network, x, y) -> data.ArrayDataset:
    ds = data.ArrayDataset(x, y, source="arrays x, y" if y is not None else "array x")
    if ds.n_features != net.n_inputs:
        raise ConfigError(f"x has {ds.n_features} features but the network's input layer has "
                          f"{net.n_inputs}")
    return ds


def _inputs(net: Network) -> preprocess.Inputs:
    return preprocess.Inputs(net.preprocess, net.n_inputs, net.dtype)


def _batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


