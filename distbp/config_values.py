"""One option value, converted: from command-line text, TOML or checkpoint JSON to its type.

A `Kind` pairs a converter `(option, value, text) -> value` with its command-line metavar; every
TrainConfig field names its kind in its metadata (`distbp.config_schema`). A converter raises a
one-line `ConfigError` naming the option, the bad value and what is allowed; `text` says the value
came from the command line, so strings are parsed, while TOML and JSON values are only type-checked
(`lr = "0.1"` is refused). `parse_layers` is the one parser of layer widths ("784,128,10"), for
`distbp train`, `bench` and `gradcheck` alike. Imports only the standard library and
`distbp.errors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distbp.errors import ConfigError

__all__ = ["BETAS", "BOOL", "CHOICE", "FLOAT", "INT", "KEY_ALIASES", "LAYERS", "NAME", "PATH",
           "Kind", "describe_value", "format_value", "option_name", "parse_layers"]


def describe_value(v: Any) -> str:
    """A TOML/JSON value as the user wrote it, with its type where that is the problem."""
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    kind = "string " if isinstance(v, str) else "array " if isinstance(v, (list, tuple)) else ""
    return kind + repr(list(v) if isinstance(v, tuple) else v)


def format_value(v: Any) -> str:
    """A converted value as it would be typed on the command line: 784,128,10; 'sgd'; 0.1."""
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return repr(v) if isinstance(v, str) else str(v)


def parse_layers(text: str, option: str = "--layers") -> tuple[int, ...]:
    """'784,128,10' -> (784, 128, 10): at least two widths, each >= 1; else one-line ConfigError
    naming `option`. The one parser of layer widths (train, bench and gradcheck options)."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers like 784,128,10, "
                          f"got {text!r}") from None
    return _checked_widths(widths, option)


def _checked_widths(widths: tuple[int, ...], option: str) -> tuple[int, ...]:
    if len(widths) < 2:
        raise ConfigError(f"{option} needs at least two sizes (in, out), got "
                          f"{format_value(widths)}")
    if any(n < 1 for n in widths):
        raise ConfigError(f"{option}: every layer needs at least one unit, got "
                          f"{format_value(widths)}")
    return widths


@dataclass(frozen=True)
class Kind:
    """A field's converter (option, value, text) -> value and its command-line metavar.

    `text`: the value came from the command line, so a string is parsed; otherwise (TOML, JSON,
    a value set in Python) only its type is checked."""

    convert: Callable[[str, Any, bool], Any]
    metavar: str


def _number(cast: type, what: str) -> Callable[[str, Any, bool], Any]:
    def convert(opt: str, v: Any, text: bool) -> Any:
        if text and isinstance(v, str):
            try:
                return cast(v.strip())
            except ValueError:
                raise ConfigError(f"{opt} must be {what}, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, cast)):  # TOML: no strings, no bools
            raise ConfigError(f"{opt} must be {what}, got {describe_value(v)}")
        return cast(v)
    return convert


def _exact(pytype: type, what: str) -> Callable[[str, Any, bool], Any]:
    """Only type-checks (strings; booleans, which argparse already converts)."""
    def convert(opt: str, v: Any, text: bool) -> Any:
        if not isinstance(v, pytype):
            raise ConfigError(f"{opt} must be {what}, got {describe_value(v)}")
        return v
    return convert


def _to_layers(opt: str, v: Any, text: bool) -> tuple[int, ...]:
    """'784,128,10' (CLI or TOML string) or [784, 128, 10] (TOML/JSON array) -> a tuple."""
    if isinstance(v, str):
        return parse_layers(v, opt)
    if isinstance(v, (list, tuple)) and all(type(n) is int for n in v):
        return _checked_widths(tuple(v), opt)
    raise ConfigError(f"{opt} must be an array of integers like [784, 128, 10], "
                      f"got {describe_value(v)}")


def _to_betas(opt: str, v: Any, text: bool) -> tuple[float, float]:
    """'0.9,0.999' (CLI or TOML string) or [0.9, 0.999] -> (β1, β2), each in [0, 1)."""
    try:
        parts = [float(p) for p in v.split(",")] if isinstance(v, str) else v
    except ValueError:
        parts = None
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2
            and all(type(b) in (int, float) and 0 <= b < 1 for b in parts)):
        shown = repr(v) if text and isinstance(v, str) else describe_value(v)
        raise ConfigError(f"{opt} must be two numbers in [0, 1) like 0.9,0.999, got {shown}")
    return (float(parts[0]), float(parts[1]))


INT = Kind(_number(int, "an integer"), "N")
FLOAT = Kind(_number(float, "a number"), "X")
BOOL = Kind(_exact(bool, "true or false"), "")
PATH = Kind(_exact(str, "a string"), "PATH")
NAME = Kind(_exact(str, "a string"), "NAME")
CHOICE = Kind(_exact(str, "a string"), "WORD")  # its `choices` make the metavar
LAYERS = Kind(_to_layers, "N,N,...")
BETAS = Kind(_to_betas, "B1,B2")


# Spellings other tools use for our options (lower case, underscores): an unknown key found here
# is answered with our name; any other unknown key with difflib's closest match.
KEY_ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "num_epochs": "epochs", "n_epochs": "epochs",
    "max_epochs": "epochs", "batch": "batch_size", "bs": "batch_size", "max_steps": "steps",
    "num_steps": "steps", "max_iters": "steps", "iterations": "steps", "wd": "weight_decay",
    "l2": "weight_decay", "optim": "optimizer", "scheduler": "schedule",
    "lr_scheduler": "schedule", "warmup": "warmup_steps", "warmup_iters": "warmup_steps",
    "beta1": "betas", "beta2": "betas", "epsilon": "eps", "adam_eps": "eps",
    "eta_min": "min_lr", "lr_min": "min_lr", "gamma": "lr_gamma", "step_size": "lr_step_size",
    "max_grad_norm": "clip_grad_norm", "gradient_clip_val": "clip_grad_norm",
    "grad_clip": "clip_grad_norm", "patience": "early_stop", "random_seed": "seed",
    "precision": "dtype", "out_dir": "run_dir", "output_dir": "run_dir",
    "save_every": "checkpoint_every", "log_interval": "log_every", "num_threads": "threads",
    "log_every_n_steps": "record_every",
    "val_split": "val_fraction", "validation_split": "val_fraction", "train_data": "data",
    "valid_data": "val_data", "validation_data": "val_data", "hidden_layers": "layers",
}


def option_name(name: str) -> str:
    """The command-line spelling of a configuration key: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")
