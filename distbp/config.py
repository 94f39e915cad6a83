"""The `distbp train` configuration: one frozen dataclass, TOML presets/files, CLI overrides.

Precedence, lowest first: field defaults < `--preset NAME` < `--config FILE` < command line.
Every option has one name: `--batch-size` on the command line, `batch_size` in TOML and here.
`None` means "off" or "derived later" (never a -1 sentinel). Values from both sources go through
one converter and one validator, so `--lr abc` and `lr = "abc"` fail with the same message; every
failure is a one-line `ConfigError` naming the option, the bad value and what is allowed.

This module gathers values (presets, TOML files, argparse options) and resolves their precedence;
the fields, their conversion and validation live in `distbp.config_schema`, whose public names
(`TrainConfig`, `validate`) are re-exported here. Both are pure validation of values: they import
nothing of MPI, data or the network. Checks that need the data (feature and class counts against
`layers`) happen in the trainer.

    parser = argparse.ArgumentParser(); add_train_arguments(parser)
    cfg = resolve_config(parser.parse_args())          # validated, frozen
    cfg2 = dataclasses.replace(cfg, lr=0.01); validate(cfg2)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from distbp.config_schema import (
    _FIELDS,
    CLI_SOURCE,
    TrainConfig,
    _kind,
    _option,
    _parse_mapping,
    _show,
    _validated,
    validate,
)
from distbp.errors import ConfigError

__all__ = ["PRESET_DIR", "TrainConfig", "add_train_arguments", "list_presets", "load_toml",
           "preset_path", "resolve_config", "validate"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "digits"

# A source that sets one member of a group clears the others set by lower-precedence sources
# (a preset's `epochs` must not block `--steps` on the command line); both in ONE source: error.
_EXCLUSIVE = (("epochs", "steps"), ("val_data", "val_fraction"))


def load_toml(path: str | Path) -> dict[str, Any]:
    """The table in a TOML file; unreadable or invalid files raise a one-line ConfigError."""
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


def _help(name: str) -> str:
    f = _FIELDS[name]
    text = f.metadata["help"]  # choices show in the metavar
    if f.default is not None:
        text += f" (default: {_show(f.default)})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _metavar(name: str) -> str:
    meta, base = _FIELDS[name].metadata, _kind(name)[0]
    if "choices" in meta:
        return "{" + ",".join(meta["choices"]) + "}"
    default = "NAME" if name.endswith("_name") else "PATH"
    return {"int": "N", "float": "X", "tuple[int, ...]": "N,N,..."}.get(base, default)


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
                        help=f"bundled TOML preset: {', '.join(list_presets()) or 'none'}")
    for name in _FIELDS:
        if _kind(name)[0] == "bool":
            parser.add_argument(_option(name), action=argparse.BooleanOptionalAction,
                                default=sup, help=_help(name))
        else:
            parser.add_argument(_option(name), type=str, default=sup, metavar=_metavar(name),
                                help=_help(name))


def _apply(values: dict[str, Any], origins: dict[str, str], new: dict[str, Any],
           source: str) -> None:
    """Lay one source's values over the lower-precedence ones (see _EXCLUSIVE)."""
    for group in _EXCLUSIVE:
        if any(k in new for k in group):
            for k in group:
                if k not in new:
                    values.pop(k, None)
                    origins.pop(k, None)
    values.update(new)
    origins.update(dict.fromkeys(new, source))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < preset < --config file < command line, converted and validated."""
    given = vars(args)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    files = []
    if given.get("preset") is not None:
        files.append((preset_path(given["preset"]), f"preset '{given['preset']}'"))
    if given.get("config") is not None:
        files.append((given["config"], f"config file '{given['config']}'"))
    for path, source in files:
        _apply(values, origins, _parse_mapping(load_toml(path), source, text=False), source)
    cli = {k: v for k, v in given.items() if k in _FIELDS}  # other CLI args are not ours
    _apply(values, origins, _parse_mapping(cli, CLI_SOURCE, text=True), CLI_SOURCE)
    if given.get("preset") is None and values.get("data") is None:
        # No data named anywhere: the bundled digits, trained with their preset, under the file
        # and the command line.
        source = f"preset '{DEFAULT_PRESET}' (the default without --data)"
        base = _parse_mapping(load_toml(preset_path(DEFAULT_PRESET)), source, text=False)
        merged, merged_origins = {}, {}
        _apply(merged, merged_origins, base, source)
        _apply(merged, merged_origins, values, "")
        merged_origins.update(origins)
        values, origins = merged, merged_origins
    return _validated(values, origins)
