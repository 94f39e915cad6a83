"""The `distbp train` options themselves: the frozen `TrainConfig`, its conversion and validation.

Each field carries in its metadata its help text, its converter (`kind`), whether None ("off",
"derived later") is allowed, and its rules (`choices`, `check`). Values from every source (TOML
table, checkpoint JSON, command-line strings) pass through one converter (`parse_options`) and one
validator, so `--lr abc` and `lr = "abc"` fail with the same one-line `ConfigError` naming the
option, the bad value and what is allowed. This module knows nothing of argparse or files and
imports only the standard library and `distbp.errors`.

    cfg = TrainConfig.from_dict({"lr": 0.01}, "config file 'run.toml'")   # validated, frozen
    cfg2 = dataclasses.replace(cfg, lr=0.02); validate(cfg2)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from distbp.config_rules import cross_problems
from distbp.config_values import (
    BETAS,
    BOOL,
    CHOICE,
    FLOAT,
    INT,
    KEY_ALIASES,
    LAYERS,
    NAME,
    PATH,
    Kind,
    describe_value,
    format_value,
    option_name,
)
from distbp.errors import ConfigError

__all__ = ["CLI_SOURCE", "DEFAULT_COLLECTIVE_TIMEOUT_S", "MAX_SEED", "MAX_STEPS",
           "OPTIONS", "OptionSpec", "TrainConfig", "build_config", "parse_options",
           "validate"]

CLI_SOURCE = "command line"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # seconds before a stuck collective aborts the job
# What the code can serve: steps fit a checkpoint's 8-digit name, a seed NumPy and an int64
# (/rng/seed), rows an int64 index, a deadline a thread's timeout (TIMEOUT_MAX: ~292 years).
MAX_STEPS, MAX_SEED, MAX_ROWS, MAX_TIMEOUT_S, MAX_THREADS = 10**8 - 1, 2**63 - 1, 2**62, 1e9, 4096
MAX_ACCUMULATE = 1 << 16  # pieces of a batch: each one is a forward/backward pass of its own



def _opt(default: Any, help: str, kind: Kind, none_ok: bool = False, **rules: Any) -> Any:
    """A field whose metadata holds its help, converter, None policy and rules."""
    return field(default=default, metadata={"help": help, "kind": kind, "none_ok": none_ok,
                                            **rules})


@dataclass(frozen=True)
class TrainConfig:
    """Every `distbp train` option. Build it with `resolve_config` or `from_dict` (validated)."""

    # data
    data: str | None = _opt(None, "training data file (HDF5/NPZ); none: bundled digits train "
                                  "split", PATH, True)
    val_data: str | None = _opt(None, "validation data file; none with no --data: bundled digits "
                                      "test split", PATH, True)
    val_fraction: float | None = _opt(None, "hold out this fraction of --data for validation "
                                            "(0 < f < 1; excludes --val-data)", FLOAT, True,
                                      check="open_unit")
    x_name: str = _opt("x", "name of the inputs dataset in the data file", NAME, check="nonempty")
    y_name: str = _opt("y", "name of the labels/targets dataset in the data file", NAME,
                       check="nonempty")
    # model
    layers: tuple[int, ...] | None = _opt(None, "layer sizes, inputs first, e.g. 784,128,10; "
                                                "none: n_features,128,n_classes from the data",
                                          LAYERS, True)
    activation: str = _opt("relu", "hidden-layer activation", CHOICE,
                           choices=("sigmoid", "tanh", "relu", "leaky_relu", "identity"))
    output: str = _opt("softmax", "output-layer activation", CHOICE,
                       choices=("softmax", "sigmoid", "identity"))
    loss: str = _opt("cross_entropy", "loss on the output activations", CHOICE,
                     choices=("cross_entropy", "mse"))
    # optimisation
    batch_size: int = _opt(64, "GLOBAL batch size, summed over all ranks", INT,
                           check="positive", most=MAX_ROWS)
    drop_last: bool = _opt(False, "drop the last partial batch of each epoch", BOOL)
    lr: float = _opt(0.1, "learning rate (peak rate when a schedule is used)", FLOAT,
                     check="positive")
    lr_reference_batch: int | None = _opt(None, "--lr is the rate for a global batch of N: the "
                                                "run uses lr * batch-size / N (linear scaling "
                                                "rule); none: --lr as given", INT, True,
                                          check="positive", most=MAX_ROWS)
    optimizer: str = _opt("sgd", "update rule (SGD, Adam, AdamW)", CHOICE,
                          choices=("sgd", "adam", "adamw"))
    momentum: float = _opt(0.0, "SGD momentum in [0, 1); 0: the plain rule "
                                "w - lr * grad (sgd only)", FLOAT, check="unit_from_zero")
    nesterov: bool = _opt(False, "Nesterov momentum (SGD with --momentum > 0)", BOOL)
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam's decay rates beta1,beta2 of the first "
                                                    "and second moments (adam and adamw only)",
                                      BETAS)
    eps: float = _opt(1e-8, "Adam's epsilon, added to the root of the second moment (adam "
                            "and adamw only)", FLOAT, check="positive")
    weight_decay: float = _opt(0.0, "L2 weight decay (decoupled for adamw)", FLOAT,
                               check="nonneg")
    schedule: str = _opt("constant", "learning-rate schedule after warmup", CHOICE,
                         choices=("constant", "step", "cosine"))
    warmup_steps: int = _opt(0, "linear warmup steps from 0 to --lr", INT, check="nonneg",
                             most=MAX_STEPS)
    lr_step_size: int | None = _opt(None, "steps between decays for --schedule step", INT, True,
                                    check="positive", most=MAX_STEPS)
    lr_gamma: float = _opt(0.1, "decay factor for --schedule step", FLOAT, check="positive")
    min_lr: float = _opt(0.0, "final learning rate for --schedule cosine", FLOAT, check="nonneg")
    clip_grad_norm: float | None = _opt(None, "scale the averaged gradient down to this global "
                                              "L2 norm when it is larger; none: no clipping",
                                        FLOAT, True, check="positive")
    # length and numerics
    epochs: int | None = _opt(None, "passes over the data (excludes --steps; neither: 10 "
                                    "epochs)", INT, True, check="positive", most=MAX_STEPS)
    steps: int | None = _opt(None, "total optimizer steps of the run (excludes --epochs)", INT,
                             True, check="positive", most=MAX_STEPS)
    early_stop: int | None = _opt(None, "stop when --early-stop-metric has not improved for this "
                                        "many validations in a row (one per epoch; needs "
                                        "validation data); none: off", INT, True,
                                  check="positive", most=MAX_STEPS)
    early_stop_metric: str = _opt("val_loss", "the validation result --early-stop watches", CHOICE,
                                  choices=("val_loss", "val_accuracy"))
    early_stop_min_delta: float = _opt(0.0, "a validation improves only when better than the "
                                            "best so far by more than this", FLOAT,
                                       check="nonneg")
    seed: int = _opt(0, "seed for initial weights and the shuffling of every epoch", INT,
                     check="nonneg", most=MAX_SEED)
    dtype: str = _opt("float32", "floating-point type of parameters and arithmetic", CHOICE,
                      choices=("float32", "float64"))
    scale: float | None = _opt(None, "multiply inputs by this per batch (e.g. 1/255 for pixels)",
                               FLOAT, True, check="positive")
    standardize: bool = _opt(False, "standardize inputs with training-set mean and std", BOOL)
    # run directory, checkpoints, logging
    run_dir: str = _opt("runs/default", "directory for checkpoints and metrics", PATH,
                        check="nonempty")
    checkpoint_dir: str | None = _opt(None, "checkpoint directory; none: <run-dir>/checkpoints",
                                      PATH, True)
    checkpoint_every: int | None = _opt(None, "checkpoint every N steps; none: at the end of each "
                                              "epoch and of the run", INT, True, check="positive",
                                      most=MAX_STEPS)
    keep: int = _opt(3, "number of newest checkpoints kept", INT, check="positive",
                     most=MAX_STEPS)
    resume: str = _opt("none", "none, auto (newest valid checkpoint in --checkpoint-dir) or a "
                               "checkpoint path", PATH, check="nonempty")
    metrics: str | None = _opt(None, "metrics JSON-lines file; none: <run-dir>/metrics.jsonl",
                               PATH, True)
    trace: str | None = _opt(None, "write a timeline of every rank's steps to this file (Chrome "
                                   "trace events, for Perfetto); none: no timeline", PATH, True)
    check_every: int | None = _opt(100, "compare parameter checksums across ranks every N steps; "
                                        "none: only at checkpoints", INT, True, check="positive",
                                  most=MAX_STEPS)
    progress: str = _opt("auto", "rank 0's progress: lines every --log-every steps, bar adds a "
                                 "bar redrawn in place, auto: bar on a terminal (under mpiexec "
                                 "stdout is a pipe: ask for bar)", CHOICE,
                         choices=("auto", "bar", "lines"))
    log_every: int | None = _opt(None, "progress line every N steps; none: about 20 per run", INT,
                                 True, check="positive", most=MAX_STEPS)
    record_every: int | None = _opt(None, "train record in the metrics file every N steps (and at "
                                          "each progress line); none: about 200 per run", INT,
                                    True, check="positive", most=MAX_STEPS)
    threads: int | None = _opt(None, "BLAS threads per rank; none: OMP/OPENBLAS/MKL_NUM_THREADS, "
                                     "else SLURM_CPUS_PER_TASK, else this rank's CPUs / ranks "
                                     "per node (never more than the CPUs)", INT, True,
                               check="positive", most=MAX_THREADS)
    collective_timeout: float | None = _opt(DEFAULT_COLLECTIVE_TIMEOUT_S, "seconds before a "
                                            "stuck collective aborts the job; none: wait "
                                            "forever", FLOAT, True, check="positive",
                                            most=MAX_TIMEOUT_S)
    in_memory: str = _opt("auto", "load the data into memory (auto: if it fits)", CHOICE,
                          choices=("auto", "yes", "no"))
    overlap: str = _opt("auto", "allreduce the gradient in buckets while backward runs (auto: "
                                "across nodes, if the first steps measure it faster)", CHOICE,
                        choices=("auto", "on", "off"))
    # 0.25 MiB: each row block of a large layer its own bucket; at 1 Gbit/s between two nodes
    # 68.8-68.9 ms a step against 69.0-71.2 with 1 MiB and 71.3-71.8 with 4 (hpc/README.md)
    bucket_mb: float = _opt(0.25, "smallest bucket of --overlap, in MiB (cut where backward "
                                  "has written a block of a layer's rows)", FLOAT,
                            check="positive", most=1e6)
    accumulate: int = _opt(1, "each rank works through its share of a global batch in N "
                              "pieces, one after the other, before the one allreduce (memory "
                              "per rank falls; the update is the same)", INT, check="positive",
                           most=MAX_ACCUMULATE)
    reproducible: bool = _opt(False, "bitwise-identical results on any number of ranks: every "
                                     "global batch is cut into --micro-batches pieces by row "
                                     "index, summed in a fixed order (one BLAS thread per rank)",
                              BOOL)
    micro_batches: int = _opt(4, "with --reproducible: micro-batches per global batch, whatever "
                                 "the number of ranks (at most this many ranks)", INT,
                              check="positive", most=MAX_ACCUMULATE)

    @property
    def metrics_file(self) -> str:
        """The metrics file this run writes: --metrics, else metrics.jsonl in --run-dir."""
        return self.metrics or os.path.join(self.run_dir, "metrics.jsonl")

    def to_dict(self) -> dict[str, Any]:
        """All fields by name, JSON-able (tuples as lists); `from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> TrainConfig:
        """A validated config from typed values (TOML table, JSON from a checkpoint).

        `source` names where `d` came from in error messages, as a phrase: "checkpoint 'c.h5'".
        Missing keys take their defaults; unknown keys and wrong types raise ConfigError.
        """
        values = parse_options(d, source, text=False)
        return build_config(values, dict.fromkeys(values, source))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class OptionSpec:
    """How one TrainConfig field appears on the command line (what `add_train_arguments` needs)."""

    name: str      # field and TOML key: "batch_size"
    option: str    # "--batch-size"
    help: str
    default: Any
    metavar: str   # "N", "{sgd,adam,adamw}", ...; "" for a flag
    flag: bool     # a boolean: --x / --no-x


def _spec(f: dataclasses.Field) -> OptionSpec:
    meta = f.metadata
    metavar = "{" + ",".join(meta["choices"]) + "}" if "choices" in meta else meta["kind"].metavar
    return OptionSpec(f.name, option_name(f.name), meta["help"], f.default, metavar,
                      meta["kind"] is BOOL)


OPTIONS = {name: _spec(f) for name, f in _FIELDS.items()}


def _where(source: str) -> str:
    return "" if source == CLI_SOURCE else f" (in {source})"


def _convert(name: str, value: Any, source: str, text: bool) -> Any:
    """One value to its field's type. `text`: strings are parsed (command line)."""
    meta = _FIELDS[name].metadata
    if meta["none_ok"] and (value is None or str(value).lower() == "none"):  # None or "none"
        return None
    try:
        return meta["kind"].convert(option_name(name), value, text)
    except ConfigError as e:
        raise ConfigError(str(e) + _where(source)) from None


def _unknown_key(key: Any, source: str) -> ConfigError:
    """The error for a key that is no option, naming our spelling of what it likely means."""
    spelled = str(key).lower().replace("-", "_")
    close = [KEY_ALIASES[spelled]] if spelled in KEY_ALIASES else \
        difflib.get_close_matches(spelled, list(_FIELDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {source}{hint}")


def parse_options(d: Any, source: str, text: bool) -> dict[str, Any]:
    """`d`'s values converted to their fields' types, unvalidated as a whole (see build_config).

    `source` names where `d` came from ("config file 'run.toml'", CLI_SOURCE); `text`: values
    are command-line strings to parse. An unknown key is a ConfigError naming the likely option.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a table of options, got {describe_value(d)}")
    for key in d:
        if key not in _FIELDS:
            raise _unknown_key(key, source)
    return {key: _convert(key, value, source, text) for key, value in d.items()}


_RULES = {  # check name -> (predicate, what is allowed)
    "positive": (lambda x: x > 0, "a positive {num}"),
    "nonneg": (lambda x: x >= 0, "a non-negative {num}"),
    "open_unit": (lambda x: 0 < x < 1, "a number strictly between 0 and 1"),
    "unit_from_zero": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "nonempty": (lambda s: s.strip() != "", "a non-empty string"),
}


def _field_problem(name: str, v: Any) -> str | None:
    """The one-field check (type, choices, range, finiteness) of a value, or None."""
    meta, opt = _FIELDS[name].metadata, option_name(name)
    if v is None and meta["none_ok"]:
        return None
    try:  # a config built by hand or by dataclasses.replace has skipped conversion
        meta["kind"].convert(opt, v, False)
    except ConfigError as e:
        return str(e)
    if "choices" in meta and v not in meta["choices"]:
        return f"{opt} must be one of {', '.join(meta['choices'])}, got {v!r}"
    rule = meta.get("check")
    if rule is None:
        return None
    ok, allowed = _RULES[rule]
    num = "integer" if isinstance(v, int) else "number"
    if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
        return f"{opt} must be {allowed.format(num=num)}, got {format_value(v)}"
    most = meta.get("most")
    if most is not None and v > most:
        return f"{opt} must be at most {most} (what distbp can serve), got {format_value(v)}"
    return None


def _problems(cfg: TrainConfig) -> Iterator[tuple[str, str]]:
    """(field, one-line message) for every violated rule, single-field rules first."""
    for name in _FIELDS:
        message = _field_problem(name, getattr(cfg, name))
        if message is not None:
            yield name, message
    yield from cross_problems(cfg)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError (one line, naming the option) for the first rule `cfg` violates."""
    for _, message in _problems(cfg):
        raise ConfigError(message)


def build_config(values: dict[str, Any], origins: dict[str, str]) -> TrainConfig:
    """A validated TrainConfig from converted `values` (missing keys take their defaults).

    `origins` maps a key to the source it came from, so a message about a value from a file
    names the file; keys it lacks are taken to come from the command line."""
    cfg = TrainConfig(**values)
    for name, message in _problems(cfg):
        raise ConfigError(message + _where(origins.get(name, CLI_SOURCE)))
    return cfg
