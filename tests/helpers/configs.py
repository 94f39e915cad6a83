"""`distbp train`'s options as the command line resolves them, for the configuration tests.

    cfg = resolve("--data", "d.h5", "--lr", "0.5")       # a validated TrainConfig
    parser = train_parser()                              # the argparse parser behind it
"""

from __future__ import annotations

import argparse

from distbp.config import add_train_arguments, resolve_config
from distbp.config_schema import TrainConfig

__all__ = ["resolve", "train_parser"]


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distbp train")
    add_train_arguments(parser)
    return parser


def resolve(*argv: str) -> TrainConfig:
    return resolve_config(train_parser().parse_args(list(argv)))
