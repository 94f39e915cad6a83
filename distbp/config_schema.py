"""The `distbp train` options themselves: the frozen `TrainConfig`, its conversion and validation.

Each field carries its default, help text and rules (`choices`, `check`) in its metadata. Values
from every source (TOML table, checkpoint JSON, command-line strings) pass through one converter
(`_parse_mapping`) and one validator (`_problems`), so `--lr abc` and `lr = "abc"` fail with the
same one-line `ConfigError` naming the option, the bad value and what is allowed.

Separate from `distbp.config`, which gathers values from presets, files and the command line and
re-exports this module's public names: this module knows nothing of argparse or files, only what a
valid config is. It imports only the standard library and `distbp.errors`.

    cfg = TrainConfig.from_dict({"lr": 0.01}, "config file 'run.toml'")   # validated, frozen
    cfg2 = dataclasses.replace(cfg, lr=0.02); validate(cfg2)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from distbp.errors import ConfigError

__all__ = ["CLI_SOURCE", "TrainConfig", "validate"]

CLI_SOURCE = "command line"


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A field with its help text and validation rules (`choices`, `check`) in its metadata."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class TrainConfig:
    """Every `distbp train` option. Build it with `resolve_config` or `from_dict` (validated)."""

    # data
    data: str | None = _opt(None, "training data file (HDF5/NPZ); none: bundled digits train split")
    val_data: str | None = _opt(None, "validation data file; none with no --data: bundled digits "
                                      "test split")
    val_fraction: float | None = _opt(None, "hold out this fraction of --data for validation "
                                            "(0 < f < 1; excludes --val-data)", check="open_unit")
    x_name: str = _opt("x", "name of the inputs dataset in the data file", check="nonempty")
    y_name: str = _opt("y", "name of the labels/targets dataset in the data file",
                       check="nonempty")
    # model
    layers: tuple[int, ...] | None = _opt(None, "layer sizes, inputs first, e.g. 784,128,10; "
                                                "none: n_features,128,n_classes from the data")
    activation: str = _opt("relu", "hidden-layer activation",
                           choices=("sigmoid", "tanh", "relu", "leaky_relu", "identity"))
    output: str = _opt("softmax", "output-layer activation",
                       choices=("softmax", "sigmoid", "identity"))
    loss: str = _opt("cross_entropy", "loss on the output activations",
                     choices=("cross_entropy", "mse"))
    # optimisation
    batch_size: int = _opt(64, "GLOBAL batch size, summed over all ranks", check="positive")
    drop_last: bool = _opt(False, "drop the last partial batch of each epoch")
    lr: float = _opt(0.1, "learning rate (peak rate when a schedule is used)", check="positive")
    optimizer: str = _opt("sgd", "update rule (SGD with momentum, Adam, AdamW)",
                          choices=("sgd", "adam", "adamw"))
    momentum: float | None = _opt(None, "SGD momentum, in [0, 1); none: 0.9 with sgd (adam and "
                                        "adamw have no momentum option)", check="unit_from_zero")
    nesterov: bool = _opt(False, "Nesterov momentum (SGD with --momentum > 0)")
    weight_decay: float = _opt(0.0, "L2 weight decay (decoupled for adamw)", check="nonneg")
    schedule: str = _opt("constant", "learning-rate schedule after warmup",
                         choices=("constant", "step", "cosine"))
    warmup_steps: int = _opt(0, "linear warmup steps from 0 to --lr", check="nonneg")
    lr_step_size: int | None = _opt(None, "steps between decays for --schedule step",
                                    check="positive")
    lr_gamma: float = _opt(0.1, "decay factor for --schedule step", check="positive")
    min_lr: float = _opt(0.0, "final learning rate for --schedule cosine", check="nonneg")
    clip_grad_norm: float | None = _opt(None, "scale the averaged gradient down to this global "
                                              "L2 norm when it is larger; none: no clipping",
                                        check="positive")
    # length and numerics
    epochs: int | None = _opt(None, "passes over the data (excludes --steps; neither: 10 epochs)",
                              check="positive")
    steps: int | None = _opt(None, "total optimizer steps of the run (excludes --epochs)",
                             check="positive")
    early_stop: int | None = _opt(None, "stop when --early-stop-metric has not improved for this "
                                        "many validations in a row (one per epoch; needs "
                                        "validation data); none: off", check="positive")
    early_stop_metric: str = _opt("val_loss", "the validation result --early-stop watches",
                                  choices=("val_loss", "val_accuracy"))
    early_stop_min_delta: float = _opt(0.0, "a validation improves only when better than the "
                                            "best so far by more than this", check="nonneg")
    seed: int = _opt(0, "seed for initial weights and the shuffling of every epoch")
    dtype: str = _opt("float32", "floating-point type of parameters and arithmetic",
                      choices=("float32", "float64"))
    scale: float | None = _opt(None, "multiply inputs by this per batch (e.g. 1/255 for pixels)",
                               check="positive")
    standardize: bool = _opt(False, "standardize inputs with training-set mean and std")
    # run directory, checkpoints, logging
    run_dir: str = _opt("runs/default", "directory for checkpoints and metrics",
                        check="nonempty")
    checkpoint_dir: str | None = _opt(None, "checkpoint directory; none: <run-dir>/checkpoints")
    checkpoint_every: int | None = _opt(None, "checkpoint every N steps; none: at the end of each "
                                              "epoch and of the run", check="positive")
    keep: int = _opt(3, "number of newest checkpoints kept", check="positive")
    resume: str = _opt("none", "none, auto (newest valid checkpoint in --checkpoint-dir) or a "
                               "checkpoint path", check="nonempty")
    metrics: str | None = _opt(None, "metrics JSON-lines file; none: <run-dir>/metrics.jsonl")
    check_every: int | None = _opt(100, "compare parameter checksums across ranks every N steps; "
                                        "none: only at checkpoints", check="positive")
    progress: str = _opt("auto", "rank 0's progress. lines: a line every --log-every steps; bar: "
                                 "those lines plus a bar redrawn in place; auto: bar on a "
                                 "terminal, else lines (under mpiexec stdout is a pipe: ask for "
                                 "bar)",
                         choices=("auto", "bar", "lines"))
    log_every: int | None = _opt(None, "progress line every N steps; none: about 20 per run",
                                 check="positive")
    threads: int | None = _opt(None, "BLAS threads per rank; none: OMP/OPENBLAS/MKL_NUM_THREADS, "
                                     "else SLURM_CPUS_PER_TASK, else this rank's CPUs / ranks "
                                     "per node (never more than the CPUs)", check="positive")
    collective_timeout: float | None = _opt(600.0, "seconds before a stuck collective aborts the "
                                                   "job; none: wait forever", check="positive")
    in_memory: str = _opt("auto", "load the data into memory (auto: if it fits)",
                          choices=("auto", "yes", "no"))

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
        values = _parse_mapping(d, source, text=False)
        return _validated(values, dict.fromkeys(values, source))


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(name: str) -> tuple[str, bool]:
    """(base type, optional) from the annotation string, e.g. 'int | None' -> ('int', True)."""
    annotation = str(_FIELDS[name].type)
    return annotation.removesuffix(" | None"), annotation.endswith(" | None")


def _describe(v: Any) -> str:
    """A TOML/JSON value as the user wrote it, with its type where that is the problem."""
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    kind = "string " if isinstance(v, str) else "array " if isinstance(v, (list, tuple)) else ""
    return kind + repr(list(v) if isinstance(v, tuple) else v)


def _show(v: Any) -> str:
    """A converted value as it would be typed on the command line."""
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return repr(v) if isinstance(v, str) else str(v)


def _number(cast: type, what: str) -> Any:
    """Converter to int or float: parses strings from the command line, type-checks the rest."""
    def convert(opt: str, v: Any, text: bool) -> Any:
        if text and isinstance(v, str):
            try:
                return cast(v.strip())
            except ValueError:
                raise ConfigError(f"{opt} must be {what}, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, cast)):  # TOML: no strings, no bools
            raise ConfigError(f"{opt} must be {what}, got {_describe(v)}")
        return cast(v)
    return convert


def _exact(pytype: type, what: str) -> Any:
    """Converter that only type-checks (strings; booleans, which argparse already converts)."""
    def convert(opt: str, v: Any, text: bool) -> Any:
        if not isinstance(v, pytype):
            raise ConfigError(f"{opt} must be {what}, got {_describe(v)}")
        return v
    return convert


def _to_layers(opt: str, v: Any, text: bool) -> tuple[int, ...]:
    """'784,128,10' (CLI or TOML string) or [784, 128, 10] (TOML/JSON array) -> a tuple."""
    if isinstance(v, str):
        try:
            return tuple(int(part) for part in v.split(","))
        except ValueError:
            raise ConfigError(f"{opt} must be comma-separated integers like 784,128,10, "
                              f"got {v!r}") from None
    if isinstance(v, (list, tuple)) and all(type(n) is int for n in v):
        return tuple(v)
    raise ConfigError(f"{opt} must be an array of integers like [784, 128, 10], "
                      f"got {_describe(v)}")


_CONVERTERS = {"int": _number(int, "an integer"), "float": _number(float, "a number"),
               "bool": _exact(bool, "true or false"), "str": _exact(str, "a string"),
               "tuple[int, ...]": _to_layers}


def _convert(name: str, value: Any, source: str, text: bool) -> Any:
    """One value to its field's type. `text`: strings are parsed (command line)."""
    base, optional = _kind(name)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    try:
        return _CONVERTERS[base](_option(name), value, text)
    except ConfigError as e:
        raise ConfigError(str(e) + _where(source)) from None


def _where(source: str) -> str:
    return "" if source == CLI_SOURCE else f" (in {source})"


def _parse_mapping(d: Any, source: str, text: bool) -> dict[str, Any]:
    """Known keys converted to field types; an unknown key names the closest valid one."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a table of options, got {_describe(d)}")
    for key in d:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")
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
    meta, opt = _FIELDS[name].metadata, _option(name)
    base, optional = _kind(name)
    if v is None and optional:
        return None
    try:  # a config built by hand or by dataclasses.replace has skipped conversion
        _CONVERTERS[base](opt, v, False)
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
        return f"{opt} must be {allowed.format(num=num)}, got {_show(v)}"
    return None


def _cross_problems(c: TrainConfig) -> Iterator[tuple[str, str]]:
    """Checks that involve the shape of `layers` or more than one option."""
    if c.layers is not None and len(c.layers) < 2:
        yield "layers", f"--layers needs at least two sizes (in, out), got {_show(c.layers)}"
    if c.layers is not None and any(n < 1 for n in c.layers):
        yield "layers", f"--layers: every layer needs at least one unit, got {_show(c.layers)}"
    if c.epochs is not None and c.steps is not None:
        yield "steps", (f"--epochs and --steps are mutually exclusive, got --epochs {c.epochs} "
                        f"and --steps {c.steps}")
    if c.val_data is not None and c.val_fraction is not None:
        yield "val_fraction", (f"--val-data and --val-fraction are mutually exclusive, got "
                               f"--val-data {c.val_data!r} and --val-fraction {c.val_fraction}")
    if c.nesterov and c.optimizer != "sgd":
        yield "nesterov", f"--nesterov needs --optimizer sgd, got --optimizer {c.optimizer}"
    if c.momentum is not None and c.optimizer != "sgd":
        yield "momentum", (f"--momentum applies to --optimizer sgd only, got --optimizer "
                           f"{c.optimizer} (Adam's first-moment decay is fixed at beta1 = 0.9)")
    if c.nesterov and c.momentum == 0:
        yield "nesterov", f"--nesterov needs --momentum > 0, got --momentum {c.momentum}"
    if c.schedule == "step" and c.lr_step_size is None:
        yield "schedule", "--schedule step needs --lr-step-size N (steps between decays)"
    if c.early_stop is not None and c.data is not None and c.val_data is None \
            and c.val_fraction is None:
        yield "early_stop", (f"--early-stop needs validation data: add --val-data FILE or "
                             f"--val-fraction F (--data {c.data!r} alone has none)")
    if c.min_lr > c.lr:
        yield "min_lr", f"--min-lr must not exceed --lr, got --min-lr {c.min_lr} > --lr {c.lr}"


def _problems(cfg: TrainConfig) -> Iterator[tuple[str, str]]:
    """(field, one-line message) for every violated rule, single-field rules first."""
    for name in _FIELDS:
        message = _field_problem(name, getattr(cfg, name))
        if message is not None:
            yield name, message
    yield from _cross_problems(cfg)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError (one line, naming the option) for the first rule `cfg` violates."""
    for _, message in _problems(cfg):
        raise ConfigError(message)


def _validated(values: dict[str, Any], origins: dict[str, str]) -> TrainConfig:
    """Build and validate; a message about a value from a file says which file."""
    cfg = TrainConfig(**values)
    for name, message in _problems(cfg):
        raise ConfigError(message + _where(origins.get(name, CLI_SOURCE)))
    return cfg

