"""Everything a run needs, built from its configuration on every rank alike, with no collective.

`build_session` opens and validates the data, derives the layer sizes, builds the network and the
optimizer, and loads the checkpoint to resume from: every check that can fail on bad input, alike
on every rank, so a bad run stops before the first collective (exit code 2)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distbp import checkpoint, data, in_memory, paths, preprocess
from distbp.config_schema import MAX_STEPS, TrainConfig, parse_options
from distbp.errors import CheckpointError, ConfigError
from distbp.network import Network, n_params
from distbp.optim import Schedule, linear_scaling, make_optimizer

__all__ = ["ARRAYS_LABEL", "DEFAULT_HIDDEN", "Session", "build_session", "check_model_memory",
           "checked_config", "claim_outputs", "default_epochs", "peak_lr", "release_outputs",
           "run_inputs", "stored_config"]

DEFAULT_HIDDEN = 128
# How a configuration names in-memory training data (distbp.fit): "<arrays sha256:…>", a digest
# of the rows, never a path (so never made absolute).
ARRAYS_LABEL = "<arrays sha256:"
default_epochs = 10
# What a resumed run may change (reported at start): its length, where and how often it
# records, and how it runs. Every other setting decides the trajectory (data, batch, seed,
# model, optimizer and its hyper-parameters, schedule, preprocessing) and must match the
# checkpoint. `steps`/`epochs` move the end of the run and with it a cosine schedule's end;
# `min_lr` is that schedule's end value. Early stopping, too, only moves the end: it is decided
# afresh from the validation history the checkpoint carries, so a new patience applies to the
# whole run (a run that stopped can go on with more patience). `clip_grad_norm` is fixed.
_MUTABLE_ON_RESUME = ("steps", "epochs", "min_lr", "run_dir", "checkpoint_dir",
                      "checkpoint_every", "keep", "resume", "metrics", "check_every", "log_every",
                      "record_every", "overlap", "bucket_mb", "trace", "progress", "threads",
                      "collective_timeout", "in_memory", "early_stop", "early_stop_metric",
                      "early_stop_min_delta", "accumulate")
# Settings added after checkpoints were first written; their defaults do what a run before them
# did, so a checkpoint that lacks one of these ran with its default.
_ADDED_LATER = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.name in ("accumulate", "reproducible", "micro_batches")}


@dataclass
class Session:
    cfg: TrainConfig
    train: data.Dataset
    val: data.Dataset | None
    net: Network
    optimizer: object
    opt_state: dict[str, np.ndarray]
    schedule: Schedule
    steps_per_epoch: int
    total_steps: int
    start_step: int = 0
    checkpoint_dir: Path = Path(".")
    metrics_path: Path = Path("metrics.jsonl")
    history: list[dict] = field(default_factory=list)
    interval: dict[str, float] = field(default_factory=dict)  # metrics.Interval.state(); {}: fresh
    preprocess: dict[str, np.ndarray] = field(default_factory=dict)
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)  # for rank 0 to print at start
    locks: list[paths.RunLock] = field(default_factory=list)  # claim_outputs, on rank 0


def build_session(cfg: TrainConfig, local_size: int = 1, rank: int = 0, size: int = 1,
                  datasets: tuple[data.Dataset, data.Dataset | None] | None = None) -> Session:
    """Open data, build model and optimizer, pick the checkpoint to resume; raises UsageError.

    `local_size`: ranks on this node, which share its memory (`--in-memory auto`). `rank` of
    `size`: the data's values (labels, NaN/inf) are checked on this rank's contiguous share of
    the rows only, so the caller must stop every rank if any rank raises (`launch.agree`).
    `datasets`: (train, validation or None) in memory instead of the files `cfg` names (fit;
    --val-fraction still splits the training rows)."""
    ckpt_dir = Path(cfg.checkpoint_dir or Path(cfg.run_dir) / "checkpoints")
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ConfigError(f"--checkpoint-dir '{ckpt_dir}' exists and is not a directory")
    metrics_path = Path(cfg.metrics_file)
    for named, directory in _locked_dirs(cfg, ckpt_dir, metrics_path):
        paths.RunLock.check_free(directory, named, ConfigError)  # before reading checkpoints
    resume, notes = _find_resume(cfg, ckpt_dir)
    if resume is not None:
        cfg = _merge_resumed_config(cfg, resume, notes)
    if cfg.reproducible and size > cfg.micro_batches:
        raise ConfigError(f"--reproducible cuts every global batch into {cfg.micro_batches} "
                          f"micro-batches (--micro-batches) and each of the {size} ranks needs "
                          f"at least one: raise --micro-batches or start fewer ranks")
    train, val = _open_data(cfg, local_size, notes) if datasets is None else datasets
    if datasets is not None and cfg.val_fraction is not None:
        train, val = data.split_validation(train, cfg.val_fraction, cfg.seed)
    layers = cfg.layers or _derive_layers(cfg, train)
    cfg = dataclasses.replace(cfg, layers=tuple(layers))  # checkpoints name the derived widths
    for ds in (train, val):
        if ds is not None:
            # int labels or (N, out) targets; values on this rank's share of the rows only
            data.validate_dataset(ds, layers[0], layers[-1], rank=rank, size=size,
                                  dtype=cfg.dtype, scale=cfg.scale or train.scale)
    check_model_memory(layers, cfg.dtype, _rows_per_pass(cfg, size, train.n), local_size,
                       _ORDERED_COPIES + cfg.micro_batches.bit_length() if cfg.reproducible else 0)
    net = Network(layers, activation=cfg.activation, output=cfg.output, loss=cfg.loss,
                  seed=cfg.seed, dtype=cfg.dtype)
    optimizer = _make_optimizer(cfg)
    spe = data.steps_per_epoch(train.n, cfg.batch_size, cfg.drop_last)
    total = _total_steps(cfg, spe)
    lr = peak_lr(cfg)
    if lr != cfg.lr:
        notes.append(f"--lr {cfg.lr:g} is for a global batch of {cfg.lr_reference_batch}: "
                     f"batch {cfg.batch_size} runs at {lr:g} (linear scaling rule)")
    schedule = Schedule(lr, cfg.schedule, cfg.warmup_steps, total, cfg.lr_step_size,
                        cfg.lr_gamma, min(cfg.min_lr, lr))
    s = Session(cfg, train, val, net, optimizer, optimizer.init(net.params), schedule, spe, total,
                checkpoint_dir=ckpt_dir, notes=notes, metrics_path=metrics_path)
    if resume is not None:
        _restore(s, resume)
    if rank == 0:  # the rank that writes them
        _check_outputs(cfg, s.checkpoint_dir, s.metrics_path, s.resumed_from)
    return s


def _total_steps(cfg: TrainConfig, spe: int) -> int:
    """--steps, else epochs x steps per epoch, within what checkpoint names can number."""
    total = cfg.steps or spe * (cfg.epochs or default_epochs)
    if total > MAX_STEPS:
        raise ConfigError(f"--epochs {cfg.epochs or default_epochs} of {spe} steps make {total} "
                          f"steps; a run may have at most {MAX_STEPS} (checkpoint names)")
    return total


def _output_dirs(cfg: TrainConfig, ckpt_dir: Path, metrics_path: Path) -> list[tuple[str, Path]]:
    """(the option that names it, directory) for the checkpoint and metrics directories."""
    return [(f"{option} {value!r}" if value is not None else f"--run-dir {cfg.run_dir!r}", d)
            for option, value, d in (("--checkpoint-dir", cfg.checkpoint_dir, ckpt_dir),
                                     ("--metrics", cfg.metrics, metrics_path.parent))]


def _locked_dirs(cfg: TrainConfig, ckpt_dir: Path, metrics_path: Path) -> list[tuple[str, Path]]:
    """The directories a run locks: its output directories and the --trace file's."""
    trace = [(f"--trace {cfg.trace!r}", Path(cfg.trace).parent)] if cfg.trace else []
    return _output_dirs(cfg, ckpt_dir, metrics_path) + trace


def _check_outputs(cfg: TrainConfig, ckpt_dir: Path, metrics_path: Path,
                   resumed: Path | None) -> None:
    """Refuse now (exit 2, naming the option), creating nothing, outputs that cannot be created
    or written, directories others may write into, a metrics file or trace that breaks
    paths.check_output's rules, is an input, is the other, or takes a name the checkpoints use.
    `claim_outputs` creates them once every rank agreed: a refused run leaves none."""
    for named, directory in _output_dirs(cfg, ckpt_dir, metrics_path):
        _probe_directory(directory, named)
        paths.check_private_directory(directory, named, ConfigError)
    named = (f"--metrics {cfg.metrics!r}" if cfg.metrics is not None
             else f"--run-dir {cfg.run_dir!r}")
    label = f"{named}: metrics file '{metrics_path}'"
    if paths.check_output(metrics_path, label, run_inputs(cfg, resumed), (), ConfigError) \
            and not os.access(metrics_path, os.W_OK):
        raise ConfigError(f"{label}: not writable")
    _outside_checkpoint_names(metrics_path, ckpt_dir, label)
    if cfg.trace is not None:
        label = f"--trace '{cfg.trace}'"
        if not Path(cfg.trace).parent.is_dir():
            raise ConfigError(f"{label}: directory '{Path(cfg.trace).parent}' does not exist")
        paths.check_output(cfg.trace, label, run_inputs(cfg, resumed),
                           (("metrics file", metrics_path),), ConfigError)
        _outside_checkpoint_names(Path(cfg.trace), ckpt_dir, label)


def _outside_checkpoint_names(path: Path, ckpt_dir: Path, label: str) -> None:
    """ConfigError if `path`, in the checkpoint directory, has a name the checkpoints take (it
    would be replaced by a checkpoint, rotated away or set aside)."""
    if os.path.realpath(path.parent) == os.path.realpath(ckpt_dir) \
            and checkpoint.is_checkpoint_name(path.name):
        raise ConfigError(f"{label}: '{path.name}' in the checkpoint directory is a name the "
                          f"checkpoints use: give another name")


def run_inputs(cfg: TrainConfig, resumed: Path | None) -> tuple[tuple[str, object], ...]:
    """(how it was named, path) of every file a run reads: what no output of it may be."""
    return (("--data", cfg.data), ("--val-data", cfg.val_data),
            ("checkpoint resumed from", resumed))


def _probe_directory(directory: Path, named: str) -> None:
    """ConfigError unless `directory` exists and is writable, or its nearest existing ancestor
    is a directory in which it can be created (a file made there and removed)."""
    existing = directory
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == directory:
            raise ConfigError(f"{named}: '{directory}' exists and is not a directory")
        raise ConfigError(f"{named}: cannot create directory '{directory}': Not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".distbp-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not writable" if existing == directory else f"cannot be created in '{existing}'"
        raise ConfigError(f"{named}: directory '{directory}' {what}: "
                          f"{e.strerror or e}") from None


def claim_outputs(s: Session, rank: int) -> list[paths.RunLock]:
    """Rank 0, once every rank accepted the setup: create the checkpoint and metrics
    directories and lock them and the --trace file's (paths.RunLock) for the run's lifetime, so
    a second run into them is refused (exit 2, naming the holder). Other ranks write nothing and
    lock nothing. Give the locks back with `release_outputs` (or exit: the kernel drops them)."""
    if rank != 0:
        return []
    for named, directory in _output_dirs(s.cfg, s.checkpoint_dir, s.metrics_path):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{named}: cannot create directory '{directory}': "
                              f"{e.strerror or e}") from None
    for named, directory in _locked_dirs(s.cfg, s.checkpoint_dir, s.metrics_path):
        if all(os.path.realpath(directory) != os.path.realpath(lock.path.parent)
               for lock in s.locks):
            s.locks.append(paths.RunLock.acquire(directory, named, ConfigError))
    s.notes += [lock.note for lock in s.locks if lock.note]
    return s.locks


def release_outputs(s: Session) -> None:
    """Give back the locks `claim_outputs` took (a script may run again into the same place)."""
    for lock in s.locks:
        lock.release()
    s.locks.clear()


def _make_optimizer(cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return make_optimizer("sgd", momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    beta1, beta2 = cfg.betas
    return make_optimizer(cfg.optimizer, weight_decay=cfg.weight_decay, beta1=beta1,
                          beta2=beta2, eps=cfg.eps)


def peak_lr(cfg: TrainConfig) -> float:
    """--lr, scaled by batch size / --lr-reference-batch when that is set (Goyal et al.)."""
    if cfg.lr_reference_batch is None:
        return cfg.lr
    return linear_scaling(cfg.lr, cfg.batch_size, cfg.lr_reference_batch)


def _open_data(cfg: TrainConfig, local_size: int,
               notes: list[str]) -> tuple[data.Dataset, data.Dataset | None]:
    def place(ds: data.Dataset) -> data.Dataset:  # --in-memory: load whole or read on demand
        ds, note = in_memory.place_in_memory(ds, cfg.in_memory, local_size)
        if note:
            notes.append(note)
        return ds

    train = place(data.open_dataset(cfg.data, cfg.x_name, cfg.y_name, split="train",
                                    local_size=local_size))
    if cfg.val_fraction is not None:
        return data.split_validation(train, cfg.val_fraction, cfg.seed)
    if cfg.val_data is not None:
        return train, place(data.open_dataset(cfg.val_data, cfg.x_name, cfg.y_name,
                                              local_size=local_size))
    if cfg.data is None:  # the bundled digits come with their test split
        return train, data.open_dataset(None, split="test")
    return train, None


def _derive_layers(cfg: TrainConfig, train: data.Dataset) -> tuple[int, ...]:
    """[n_features, 128, n_outputs]: n_outputs from the target width or the largest label + 1."""
    if len(train.y_shape) == 2:
        n_out = train.y_shape[1]
    else:
        n_out = 0
        for lo in range(0, train.n, 1 << 16):
            rows = np.arange(lo, min(lo + (1 << 16), train.n))
            n_out = max(n_out, int(np.max(train.read_y(rows))) + 1)
        if cfg.output == "sigmoid" and n_out <= 2:
            n_out = 1
    return (train.n_features, DEFAULT_HIDDEN, max(n_out, 1))


def _find_resume(cfg: TrainConfig, ckpt_dir: Path) -> tuple[checkpoint.Checkpoint | None, list]:
    if cfg.resume == "none":
        return None, []
    if cfg.resume == "auto":
        path, skipped = checkpoint.latest_valid(ckpt_dir)
        notes = [f"skipping checkpoint {p}: {why}" for p, why in skipped]
        if path is None and skipped:  # checkpoints exist, none verifies: do not silently restart
            raise CheckpointError(
                f"--resume auto: none of the {len(skipped)} checkpoint(s) in '{ckpt_dir}' "
                f"verifies (newest: {skipped[0][1]}); use --resume none to start over")
        if path is None:
            notes.append(f"--resume auto: no checkpoint in '{ckpt_dir}' yet, starting fresh")
            return None, notes
        return checkpoint.load(path), notes
    return checkpoint.load(cfg.resume), []


def _merge_resumed_config(cfg: TrainConfig, ckpt, notes: list[str]) -> TrainConfig:
    """Refuse changes that alter the trajectory; report the ones that may change."""
    old = checked_config(ckpt)
    layers = cfg.layers or tuple(ckpt.layers)
    checkpoint.check_compatible(ckpt, layers=layers, activation=cfg.activation,
                                output=cfg.output, loss=cfg.loss, dtype=cfg.dtype)
    new = dataclasses.replace(cfg, layers=tuple(layers)).to_dict()
    old = {**_ADDED_LATER, **old}
    missing = sorted(set(new) - set(old))
    if missing:  # a setting it does not name cannot be compared: refuse, never guess
        raise CheckpointError(f"checkpoint '{ckpt.path}': its configuration lacks "
                              f"{', '.join(missing)}")
    differ = [k for k in new if _norm(old[k], k) != _norm(new[k], k)]
    fixed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in differ if k not in _MUTABLE_ON_RESUME]
    if fixed:
        raise CheckpointError(f"checkpoint '{ckpt.path}' was written with other settings that "
                              f"decide the trajectory: {'; '.join(fixed)} (only "
                              f"{', '.join(_MUTABLE_ON_RESUME[:3])}, the early-stop options "
                              f"and where/how the run records may change on resume)")
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in differ if k != "resume"]
    if changed:
        notes.append("resuming with changed settings: " + "; ".join(changed))
    return dataclasses.replace(cfg, layers=tuple(layers))


def checked_config(ckpt: checkpoint.Checkpoint) -> dict:
    """The checkpoint's configuration, every key an option and every value of its type (a
    forged file's `{"batch_size": "x"}` is a CheckpointError, not a TypeError later)."""
    try:
        parse_options(ckpt.config, f"checkpoint '{ckpt.path}'", text=False)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{ckpt.path}': its configuration: {e}") from None
    return ckpt.config


# A run holds about this many arrays the size of the parameters (parameters, gradient,
# optimizer state, scratch, the checkpoint's copies) and of a layer's activations (a, z, δ, ...);
# reproducible mode adds its exchange buffers and one node sum per level of its tree.
_PARAM_COPIES, _ACTIVATION_COPIES, _ORDERED_COPIES = 8, 4, 3


def _rows_per_pass(cfg: TrainConfig, size: int, n: int) -> int:
    """The most rows one forward/backward pass takes over `n` training rows: a micro-batch
    (--reproducible), else a rank's shard, or its piece with --accumulate."""
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    batch = min(cfg.batch_size, n)
    if cfg.reproducible:
        return ceil_div(batch, cfg.micro_batches)
    return ceil_div(ceil_div(batch, size), cfg.accumulate)


def check_model_memory(layers, dtype, rows: int, local_size: int = 1, extra: int = 0) -> None:
    """ConfigError, before anything is allocated, when a network of `layers` passing `rows` rows
    at a time forward and backward (and holding `extra` more arrays of the parameters' size)
    cannot fit in the memory one of `local_size` ranks on this node may use."""
    budget = in_memory.in_memory_budget(local_size)
    item = np.dtype(dtype).itemsize
    need = item * ((_PARAM_COPIES + extra) * n_params(layers)
                   + _ACTIVATION_COPIES * rows * sum(layers))
    if budget is not None and need > budget:
        raise ConfigError(f"--layers {','.join(map(str, layers))} ({n_params(layers):,} "
                          f"parameters, {rows} rows a pass) needs about {need / 2**30:.1f} GiB "
                          f"per rank, more than the {budget / 2**30:.1f} GiB one of "
                          f"{local_size} rank(s) on this node may use")


def stored_config(cfg: TrainConfig) -> dict:
    """The configuration as checkpoints store it: data paths absolute, so the files are named
    unambiguously whatever directory a later resume or `distbp evaluate` runs from."""
    d = cfg.to_dict()
    for key in ("data", "val_data"):
        d[key] = _norm(d[key], key)
    return d


def _norm(v, key: str = ""):
    if key in ("data", "val_data") and isinstance(v, str) and not v.startswith(ARRAYS_LABEL):
        return os.path.abspath(v)  # the same file typed relative or absolute
    return list(v) if isinstance(v, (tuple, list)) else v


def _restore(s: Session, ckpt) -> None:
    if ckpt.optimizer_name != s.optimizer.name:
        raise CheckpointError(f"checkpoint '{ckpt.path}' holds {ckpt.optimizer_name} state, "
                              f"the configuration asks for {s.optimizer.name}")
    np.copyto(s.net.params, ckpt.params)
    for key, value in ckpt.optimizer_state.items():
        if key not in s.opt_state:
            raise CheckpointError(f"checkpoint '{ckpt.path}': unexpected optimizer state {key!r}")
        want = s.opt_state[key]
        if value.shape != want.shape or not np.can_cast(value.dtype, want.dtype, "same_kind"):
            raise CheckpointError(f"checkpoint '{ckpt.path}': optimizer state {key!r} is "
                                  f"{value.dtype} {value.shape}, {s.optimizer.name} needs "
                                  f"{want.dtype} {want.shape}")
        np.copyto(want, value)
    try:
        preprocess.check(ckpt.preprocess, s.net.n_inputs)
    except ValueError as e:
        raise CheckpointError(f"checkpoint '{ckpt.path}': {e}") from None
    missing = set(s.opt_state) - set(ckpt.optimizer_state) - {"_scratch"}
    if missing:
        raise CheckpointError(f"checkpoint '{ckpt.path}': optimizer state lacks {sorted(missing)}")
    # The cursor is derived from the step; a stored one that disagrees means the epoch length
    # changed (the data file has another number of rows): the batches would not continue.
    cursor = data.step_cursor(ckpt.step, s.steps_per_epoch)
    if cursor != (ckpt.epoch, ckpt.step_in_epoch):
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' is at epoch {ckpt.epoch}, step {ckpt.step_in_epoch} of "
            f"its epoch, but with {s.train.n} training rows step {ckpt.step} is epoch "
            f"{cursor[0]}, step {cursor[1]}: the training data changed since it was written")
    s.start_step = ckpt.step
    s.history = [r for r in ckpt.metrics if r.get("step", 0) <= ckpt.step]
    s.interval = dict(ckpt.interval)
    s.preprocess = dict(ckpt.preprocess)
    s.resumed_from = ckpt.path
    if ckpt.step >= s.total_steps:
        s.notes.append(f"checkpoint '{ckpt.path}' is at step {ckpt.step}, the run's total is "
                       f"{s.total_steps}: nothing left to train")
