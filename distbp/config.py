"""Gather `distbp train`'s options from presets, TOML files and the command line; resolve them.

Precedence, lowest first: field defaults < `--preset NAME` < `--config FILE` < command line; with
no data named anywhere (and no --preset) the digits preset applies under the file and the command
line. A TOML key is the option with underscores (`--batch-size` -> batch_size). The result is a
validated, frozen `distbp.config_schema.TrainConfig`; every failure is a one-line `ConfigError`.

    parser = argparse.ArgumentParser(); add_train_arguments(parser)
    cfg = resolve_config(parser.parse_args())
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from distbp.config_rules import OPTIMIZER_OPTIONS
from distbp.config_schema import (
    CLI_SOURCE,
    OPTIONS,
    TrainConfig,
    build_config,
    parse_options,
)
from distbp.config_values import format_value
from distbp.errors import ConfigError
from distbp.paths import check_not_input, check_regular

__all__ = ["DEFAULT_PRESET", "PRESET_DIR", "add_train_arguments", "list_presets", "load_toml",
           "preset_path", "resolve_config", "resolve_options"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "digits"
_DEFAULT_SOURCE = f"preset '{DEFAULT_PRESET}' (the default without --data)"

# A source that sets one member of a group clears the others set by lower-precedence sources
# (a preset's `epochs` must not block `--steps` on the command line); both in ONE source: error.
_EXCLUSIVE = (("epochs", "steps"), ("val_data", "val_fraction"))


def load_toml(path: str | Path) -> dict[str, Any]:
    """The table in a TOML file; unreadable or invalid files raise a one-line ConfigError."""
    if os.path.lexists(path):  # a FIFO would block the read forever
        check_regular(path, f"config file '{path}'", ConfigError)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"config file '{path}': cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}': invalid TOML: not UTF-8 ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)  # "Invalid value (at line 3, column 5)"; no lineno attribute before 3.14
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            msg = f"{msg[:m.start()]} (line {m.group(1)}, column {m.group(2)})"
        raise ConfigError(f"config file '{path}': invalid TOML: {msg}") from None


def list_presets() -> list[str]:
    """Names of the bundled presets (distbp/presets/NAME.toml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The TOML file of a bundled preset; an unknown name lists the valid ones."""
    names = list_presets()
    if name not in names:
        raise ConfigError(f"--preset: unknown preset {name!r} (presets: {', '.join(names)})")
    return PRESET_DIR / f"{name}.toml"


def _default_preset() -> dict[str, Any]:
    """The digits preset's values: what applies without --data (and without --preset)."""
    return parse_options(load_toml(preset_path(DEFAULT_PRESET)), _DEFAULT_SOURCE, text=False)


def _help(name: str, preset: dict[str, Any]) -> str:
    """The field's help with the default that applies; where the digits preset (in force without
    --data) sets another value, that one too."""
    spec = OPTIONS[name]
    shown = []
    if spec.default is not None:
        shown.append(f"default: {format_value(spec.default)}")
    if name in preset and preset[name] != spec.default:
        shown.append(f"{DEFAULT_PRESET} preset without --data: {format_value(preset[name])}")
    text = spec.help + (f" ({'; '.join(shown)})" if shown else "")
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--preset` and one long option per TrainConfig field.

    Defaults are SUPPRESS, so the namespace holds only what was typed; values stay strings here
    and are converted by `resolve_config` (so `--lr abc` is a ConfigError, not argparse's exit).
    """
    sup = argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", default=sup,
                        help="TOML file of options (keys as below, with underscores); "
                             "overrides --preset, overridden by the command line")
    parser.add_argument("--preset", metavar="NAME", default=sup,
                        help=f"bundled TOML preset: {', '.join(list_presets()) or 'none'} "
                             f"(without --data and --preset: {DEFAULT_PRESET})")
    preset = _default_preset()
    for spec in OPTIONS.values():
        if spec.flag:
            parser.add_argument(spec.option, action=argparse.BooleanOptionalAction,
                                default=sup, help=_help(spec.name, preset))
        else:
            parser.add_argument(spec.option, type=str, default=sup, metavar=spec.metavar,
                                help=_help(spec.name, preset))


def _apply(values: dict[str, Any], origins: dict[str, str], new: dict[str, Any],
           source: str) -> None:
    """Lay one source's values over the lower-precedence ones.

    A source that sets one member of an _EXCLUSIVE group clears the others set below it; one
    that sets `optimizer` clears the options of other optimizers set below it (a preset's
    momentum does not block --optimizer adam)."""
    cleared = [k for group in _EXCLUSIVE if any(k in new for k in group) for k in group]
    if "optimizer" in new:
        own = OPTIMIZER_OPTIONS.get(new["optimizer"], ())
        cleared += [k for names in OPTIMIZER_OPTIONS.values() for k in names if k not in own]
    for k in cleared:
        if k not in new:
            values.pop(k, None)
            origins.pop(k, None)
    values.update(new)
    origins.update(dict.fromkeys(new, source))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < preset < --config file < command line, converted and validated."""
    given = vars(args)
    cli = {k: v for k, v in given.items() if k in OPTIONS}  # other CLI args are not ours
    return _resolve(given.get("preset"), given.get("config"), cli, CLI_SOURCE, text=True)


def resolve_options(options: dict[str, Any], source: str = "fit()") -> TrainConfig:
    """As `resolve_config`, for typed values (distbp.fit's keyword arguments): `preset` and
    `config` (a TOML file) are taken from `options` like the command line's --preset, --config."""
    options = dict(options)
    preset, config = options.pop("preset", None), options.pop("config", None)
    return _resolve(preset, config, options, source, text=False)


def _resolve(preset: str | None, config: str | None, given: dict[str, Any], source: str,
             text: bool) -> TrainConfig:
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    files = []
    if preset is not None:
        files.append((preset_path(preset), f"preset '{preset}'"))
    if config is not None:
        files.append((config, f"config file '{config}'"))
    for path, file_source in files:
        _apply(values, origins, parse_options(load_toml(path), file_source, text=False),
               file_source)
    _apply(values, origins, parse_options(given, source, text=text), source)
    if preset is None and values.get("data") is None:
        # No data named anywhere: the bundled digits, trained with their preset, under the file
        # and the given values.
        merged, merged_origins = {}, {}
        _apply(merged, merged_origins, _default_preset(), _DEFAULT_SOURCE)
        _apply(merged, merged_origins, values, "")
        merged_origins.update(origins)
        values, origins = merged, merged_origins
    cfg = build_config(values, origins)
    if config is not None:  # read already, but the run must not overwrite it
        for option, output in (("--metrics", cfg.metrics_file), ("--trace", cfg.trace)):
            if output is not None:
                check_not_input(output, (("--config file", config),), f"{option} '{output}'",
                                ConfigError)
    return cfg
