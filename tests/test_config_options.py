"""distbp.config_schema's optimizer options (momentum in force, Adam's betas and eps, the linear
scaling rule's reference batch) and that their defaults train; the help that states the defaults
in force, the aliases of other tools' key names, and the one layer-width parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env
from helpers.configs import resolve, train_parser

from distbp.config import DEFAULT_PRESET
from distbp.config_schema import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    OPTIONS,
    TrainConfig,
    validate,
)
from distbp.config_values import KEY_ALIASES, format_value, parse_layers
from distbp.errors import ConfigError


def config_error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(*argv)
    assert "\n" not in str(info.value)
    return str(info.value)


def write_toml(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- momentum: the value in force, in the config ----------------------------------------------

def test_sgd_without_momentum_holds_momentum_zero_and_prints_it():
    cfg = resolve("--data", "d.h5")
    assert (cfg.optimizer, cfg.momentum) == ("sgd", 0.0)
    assert json.loads(json.dumps(cfg.to_dict()))["momentum"] == 0.0  # as checkpoints store it


def test_presets_keep_their_momentum_and_the_command_line_overrides_it():
    assert resolve().momentum == 0.9                       # digits preset, no --data
    assert resolve("--preset", "fashion-mnist").momentum == 0.9
    assert resolve("--momentum", "0").momentum == 0.0


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def distbp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distbp", *args], capture_output=True,
                          text=True, timeout=300, env=child_env(), cwd=cwd)


@pytest.mark.skipif(not DEBIAN.is_dir(),
                    reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_with_default_optimizer_options_reaches_080_in_2000_steps(tmp_path):
    """Plain SGD at lr 0.1, batch 64. The earlier default, momentum 0.9 for sgd, diverged to
    chance (0.10) on this command: an effective step of lr / (1 - momentum) = 1.0."""
    made = distbp("data", "fashion-mnist", "--out", "fm", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    run = distbp("train", "--data", "fm/fashion-mnist-train.h5", "--val-data",
                 "fm/fashion-mnist-test.h5", "--layers", "784,256,128,10", "--standardize",
                 "--steps", "2000", "--run-dir", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert '"momentum": 0.0' in run.stdout and '"optimizer": "sgd"' in run.stdout
    scored = distbp("evaluate", "run/checkpoints/ckpt-00002000.h5", "--data",
                    "fm/fashion-mnist-test.h5", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout.splitlines()[-1])["accuracy"] >= 0.80  # measured 0.87


def test_a_stored_config_of_a_new_run_compares_equal_to_the_same_command_line():
    """What a resume checks, key by key: the stored JSON against the new configuration."""
    argv = ("--data", "d.h5", "--optimizer", "adamw", "--betas", "0.8,0.95", "--eps", "1e-6",
            "--lr-reference-batch", "256")
    stored = json.loads(json.dumps(resolve(*argv).to_dict()))
    new = resolve(*argv).to_dict()
    assert {k: v for k, v in stored.items() if v != new[k]} == {}
    assert TrainConfig.from_dict(stored, "checkpoint 'c.h5'") == resolve(*argv)


def test_choosing_adam_clears_momentum_set_by_a_lower_precedence_preset(tmp_path):
    for argv in (("--optimizer", "adam"), ("--preset", "fashion-mnist", "--optimizer", "adamw")):
        cfg = resolve(*argv)
        assert (cfg.momentum, cfg.nesterov) == (0.0, False), argv
    path = write_toml(tmp_path, 'optimizer = "adam"\n')
    assert resolve("--preset", "digits", "--config", path).momentum == 0.0
    # Betas set below a source that picks sgd are cleared too.
    path = write_toml(tmp_path, 'optimizer = "adam"\nbetas = [0.5, 0.9]\n', "adam.toml")
    assert resolve("--config", path, "--optimizer", "sgd").betas == (0.9, 0.999)


def test_momentum_and_adam_in_one_source_is_still_an_error(tmp_path):
    path = write_toml(tmp_path, 'optimizer = "adam"\nmomentum = 0.5\n')
    message = config_error("--config", path)
    assert message == ("--momentum applies to --optimizer sgd only, got --optimizer adam "
                       f"(in config file '{path}')")


# ---- Adam's betas and eps -----------------------------------------------------------------------

def test_betas_and_eps_reach_the_config_from_command_line_and_toml(tmp_path):
    cli = resolve("--data", "d.h5", "--optimizer", "adam", "--betas", "0.8, 0.99",
                  "--eps", "1e-6")
    assert (cli.betas, cli.eps) == ((0.8, 0.99), 1e-6)
    path = write_toml(tmp_path, 'data = "d.h5"\noptimizer = "adam"\nbetas = [0.8, 0.99]\n'
                                'eps = 1e-6\n')
    assert resolve("--config", path) == cli
    assert TrainConfig().betas == (0.9, 0.999) and TrainConfig().eps == 1e-8


@pytest.mark.parametrize(("argv", "expected"), [
    (("--betas", "0.9"), "--betas must be two numbers in [0, 1) like 0.9,0.999, got '0.9'"),
    (("--betas", "0.9,1"), "--betas must be two numbers in [0, 1) like 0.9,0.999, got '0.9,1'"),
    (("--betas", "a,b"), "--betas must be two numbers in [0, 1) like 0.9,0.999, got 'a,b'"),
    (("--betas", "nan,0.9"), "--betas must be two numbers in [0, 1)"),
    (("--eps", "0"), "--eps must be a positive number, got 0.0"),
    (("--optimizer", "sgd", "--betas", "0.8,0.99"),
     "--betas applies to --optimizer adam and adamw only, got --optimizer sgd"),
    (("--eps", "1e-6"), "--eps applies to --optimizer adam and adamw only, got --optimizer sgd"),
    (("--optimizer", "adamw", "--momentum", "0.9"),
     "--momentum applies to --optimizer sgd only, got --optimizer adamw"),
    (("--lr-reference-batch", "0"), "--lr-reference-batch must be a positive integer, got 0"),
    (("--momentum", "none"), "--momentum must be a number, got 'none'"),
])
def test_bad_optimizer_option_is_one_line_naming_the_option(argv, expected):
    assert config_error("--data", "d.h5", *argv).startswith(expected)


def test_betas_from_toml_must_be_an_array_of_two_numbers(tmp_path):
    path = write_toml(tmp_path, 'betas = ["0.9", "0.99"]\n')
    assert "--betas must be two numbers in [0, 1) like 0.9,0.999, got array ['0.9', '0.99']" \
        in config_error("--config", path)


def test_options_left_at_their_defaults_are_accepted_with_either_optimizer():
    validate(TrainConfig(optimizer="adam", momentum=0.0))
    validate(TrainConfig(optimizer="sgd", betas=(0.9, 0.999), eps=1e-8))


def test_lr_reference_batch_is_off_by_default_and_converts_from_either_source(tmp_path):
    assert TrainConfig().lr_reference_batch is None
    assert resolve("--data", "d.h5", "--lr-reference-batch", "256").lr_reference_batch == 256
    path = write_toml(tmp_path, 'data = "d.h5"\nlr_reference_batch = "none"\n')
    assert resolve("--config", path).lr_reference_batch is None


def test_collective_timeout_default_is_the_shared_constant():
    assert TrainConfig().collective_timeout == DEFAULT_COLLECTIVE_TIMEOUT_S == 600.0


# ---- help states the defaults that apply --------------------------------------------------------

def _helps() -> dict[str, str]:
    return {a.dest: a.help for a in train_parser()._actions}


def test_help_names_the_digits_preset_value_where_it_replaces_the_default():
    helps = _helps()
    assert helps["batch_size"].endswith(f"(default: 64; {DEFAULT_PRESET} preset without "
                                        "--data: 32)")
    assert "(default: 'constant'; digits preset without --data: 'cosine')" in helps["schedule"]
    assert "(default: 0.0; digits preset without --data: 0.9)" in helps["momentum"]
    assert "(digits preset without --data: 30)" in helps["epochs"]
    assert "without --data and --preset: digits" in helps["preset"]
    assert "preset" not in helps["lr"] and "(default: 0.1)" in helps["lr"]  # same in the preset
    assert "%%" not in train_parser().format_help()


def test_every_value_the_help_states_is_the_one_a_run_gets():
    """Without --data the preset's stated value applies; with --data the stated default."""
    without, with_data = resolve(), resolve("--data", "d.h5")
    marker = "digits preset without --data: "
    for name, spec in OPTIONS.items():
        text = _helps()[name].replace("%%", "%")
        if marker in text:
            stated = text.split(marker)[1].rsplit(")", 1)[0]
            assert format_value(getattr(without, name)) == stated, name
        elif spec.default is not None and name not in ("data", "val_data"):
            assert getattr(without, name) == spec.default, name
        if spec.default is not None:
            assert f"(default: {format_value(spec.default)}" in text, name
            assert getattr(with_data, name) == spec.default or name == "data", name


# ---- unknown keys: other tools' names -----------------------------------------------------------

@pytest.mark.parametrize(("key", "ours"), [
    ("learning_rate", "lr"), ("num_epochs", "epochs"), ("batch", "batch_size"),
    ("max_steps", "steps"), ("wd", "weight_decay"), ("optim", "optimizer"),
    ("Learning-Rate", "lr"), ("beta1", "betas"), ("patience", "early_stop"),
])
def test_unknown_key_of_another_tool_names_our_option(tmp_path, key, ours):
    path = write_toml(tmp_path, f'"{key}" = 1\n')
    assert config_error("--config", path) == (
        f"unknown key {key!r} in config file '{path}' (did you mean {ours!r}?)")


def test_every_alias_names_an_option_and_is_no_option_itself():
    assert set(KEY_ALIASES.values()) <= set(OPTIONS)
    assert not set(KEY_ALIASES) & set(OPTIONS)
    assert all(k == k.lower() and "-" not in k for k in KEY_ALIASES)


def test_unknown_key_not_in_the_table_still_gets_difflib_s_closest_option():
    with pytest.raises(ConfigError, match=r"unknown key 'momentun' in x \(did you mean "
                                          r"'momentum'\?\)"):
        TrainConfig.from_dict({"momentun": 0.9}, "x")


# ---- layer widths -------------------------------------------------------------------------------

def test_parse_layers_returns_widths_and_names_the_option_it_is_given():
    assert parse_layers("784,128,10") == (784, 128, 10)
    assert parse_layers(" 8, 4 ") == (8, 4)
    for text, message in (("784", "--sizes needs at least two sizes (in, out), got 784"),
                          ("8,0,2", "--sizes: every layer needs at least one unit, got 8,0,2"),
                          ("8,,2", "--sizes must be comma-separated integers like 784,128,10, "
                                   "got '8,,2'"),
                          ("", "--sizes must be comma-separated integers")):
        with pytest.raises(ConfigError) as info:
            parse_layers(text, "--sizes")
        assert str(info.value).startswith(message)
