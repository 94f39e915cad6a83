"""distbp.config and config_schema: defaults, precedence, conversion, validation messages, presets,
round-trips."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path

import pytest
from helpers.configs import resolve, train_parser

from distbp.config import (
    list_presets,
    load_toml,
    preset_path,
    resolve_config,
)
from distbp.config_schema import TrainConfig, validate
from distbp.errors import ConfigError


def write_toml(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(*argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_validate_and_equal_a_command_line_that_names_data():
    validate(TrainConfig())
    assert resolve("--data", "x.h5") == dataclasses.replace(TrainConfig(), data="x.h5")
    assert TrainConfig().epochs is None and TrainConfig().steps is None
    assert TrainConfig().collective_timeout == 600.0 and TrainConfig().check_every == 100
    assert TrainConfig().momentum == 0.0  # plain SGD, as PyTorch's and Keras's default


def test_digits_preset_parses_validates_and_leaves_data_and_layers_derived():
    assert "digits" in list_presets()
    assert preset_path("digits").is_file()
    cfg = resolve("--preset", "digits")
    assert (cfg.epochs, cfg.schedule, cfg.batch_size) == (30, "cosine", 32)
    assert (cfg.lr, cfg.momentum, cfg.activation) == (0.1, 0.9, "relu")
    assert cfg.data is None and cfg.val_data is None and cfg.layers is None


def test_no_data_anywhere_means_the_digits_preset_under_file_and_command_line(tmp_path):
    assert resolve() == resolve("--preset", "digits")
    assert resolve("--steps", "7").steps == 7 and resolve("--steps", "7").epochs is None
    cfg = resolve("--config", write_toml(tmp_path, "lr = 0.02\n"), "--batch-size", "16")
    assert (cfg.lr, cfg.batch_size, cfg.schedule) == (0.02, 16, "cosine")
    named = resolve("--config", write_toml(tmp_path, 'data = "d.h5"\n', "d.toml"))
    assert named.schedule == "constant" and named.batch_size == 64


def test_precedence_is_defaults_then_preset_then_file_then_command_line(tmp_path):
    path = write_toml(tmp_path, 'lr = 0.05\nbatch_size = 32\noptimizer = "adam"\n')
    cfg = resolve("--preset", "digits", "--config", path, "--batch-size", "16")
    assert cfg.batch_size == 16            # command line beats file
    assert cfg.lr == 0.05                  # file beats preset (0.1)
    assert cfg.optimizer == "adam"         # file beats default
    assert cfg.epochs == 30                # preset beats default (None)
    assert cfg.seed == 0 and cfg.keep == 3  # untouched defaults


def test_steps_on_command_line_replaces_epochs_from_preset(tmp_path):
    cfg = resolve("--preset", "digits", "--steps", "50")
    assert (cfg.epochs, cfg.steps) == (None, 50)
    path = write_toml(tmp_path, 'val_data = "v.h5"\n')
    cfg = resolve("--config", path, "--val-fraction", "0.2")
    assert (cfg.val_data, cfg.val_fraction) == (None, 0.2)


def test_epochs_and_steps_in_one_file_is_an_error(tmp_path):
    path = write_toml(tmp_path, "epochs = 3\nsteps = 10\n")
    message = config_error("--config", path)
    assert "--epochs and --steps are mutually exclusive" in message and path in message


def test_values_convert_to_field_types_from_either_source(tmp_path):
    cli = resolve("--layers", "64,32,10", "--lr", "1", "--check-every", "none", "--threads", "2")
    assert cli.layers == (64, 32, 10) and cli.lr == 1.0 and isinstance(cli.lr, float)
    assert cli.check_every is None and cli.threads == 2
    text = 'layers = [64, 32, 10]\nlr = 1\ncheck_every = "none"\nthreads = 2\n'
    path = write_toml(tmp_path, text)
    assert resolve("--config", path) == cli
    path = write_toml(tmp_path, 'layers = "64, 32, 10"\n', "s.toml")
    assert resolve("--config", path).layers == (64, 32, 10)


def test_unrelated_namespace_entries_are_ignored():
    args = train_parser().parse_args(["--lr", "0.5", "--data", "d.h5"])
    args.command = "train"
    assert resolve_config(args) == TrainConfig(lr=0.5, data="d.h5")


# (command-line arguments, exact message or fragment that must appear)
CLI_CASES = [
    (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "abc"], "--lr must be a number, got 'abc'"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "2.5"], "--batch-size must be an integer, got '2.5'"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--steps", "-5"], "--steps must be a positive integer, got -5"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer, got 0"),
    (["--keep", "0"], "--keep must be a positive integer, got 0"),
    (["--check-every", "0"], "--check-every must be a positive integer, got 0"),
    (["--log-every", "0"], "--log-every must be a positive integer, got 0"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--lr-step-size", "0"], "--lr-step-size must be a positive integer, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be a non-negative integer, got -1"),
    (["--weight-decay", "-0.5"], "--weight-decay must be a non-negative number, got -0.5"),
    (["--min-lr", "-1"], "--min-lr must be a non-negative number, got -1.0"),
    (["--lr-gamma", "0"], "--lr-gamma must be a positive number, got 0.0"),
    (["--momentum", "1"], "--momentum must be a number in [0, 1), got 1.0"),
    (["--momentum", "-0.5"], "--momentum must be a number in [0, 1), got -0.5"),
    (["--val-fraction", "0"], "--val-fraction must be a number strictly between 0 and 1, got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be a number strictly between 0 and 1, got 1.0"),
    (["--collective-timeout", "0"], "--collective-timeout must be a positive number, got 0.0"),
    (["--scale", "0"], "--scale must be a positive number, got 0.0"),
    (["--scale", "inf"], "--scale must be a positive number, got inf"),
    (["--activation", "gelu"],
     "--activation must be one of sigmoid, tanh, relu, leaky_relu, identity, got 'gelu'"),
    (["--output", "relu"], "--output must be one of softmax, sigmoid, identity, got 'relu'"),
    (["--loss", "hinge"], "--loss must be one of cross_entropy, mse, got 'hinge'"),
    (["--optimizer", "rmsprop"], "--optimizer must be one of sgd, adam, adamw, got 'rmsprop'"),
    (["--schedule", "linear"], "--schedule must be one of constant, step, cosine, got 'linear'"),
    (["--dtype", "float16"], "--dtype must be one of float32, float64, got 'float16'"),
    (["--in-memory", "maybe"], "--in-memory must be one of auto, yes, no, got 'maybe'"),
    (["--run-dir", ""], "--run-dir must be a non-empty string, got ''"),
    (["--layers", "64,0,10"], "--layers: every layer needs at least one unit, got 64,0,10"),
    (["--layers", "784"], "--layers needs at least two sizes (in, out), got 784"),
    (["--layers", "64,a,10"], "--layers must be comma-separated integers like 784,128,10"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum > 0, got --momentum 0.0"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs --optimizer sgd"),
    (["--schedule", "step"], "--schedule step needs --lr-step-size"),
    (["--epochs", "5", "--steps", "10"], "--epochs and --steps are mutually exclusive"),
    (["--val-data", "v.h5", "--val-fraction", "0.1"],
     "--val-data and --val-fraction are mutually exclusive"),
    (["--min-lr", "0.5", "--lr", "0.1"], "--min-lr must not exceed --lr"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be a positive number, got 0.0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be a positive number, got -1.0"),
    (["--clip-grad-norm", "inf"], "--clip-grad-norm must be a positive number, got inf"),
    (["--clip-grad-norm", "big"], "--clip-grad-norm must be a number, got 'big'"),
    (["--early-stop", "0"], "--early-stop must be a positive integer, got 0"),
    (["--early-stop", "2.5"], "--early-stop must be an integer, got '2.5'"),
    (["--early-stop-metric", "loss"],
     "--early-stop-metric must be one of val_loss, val_accuracy, got 'loss'"),
    (["--early-stop-min-delta", "-0.1"],
     "--early-stop-min-delta must be a non-negative number, got -0.1"),
    (["--early-stop", "3", "--data", "d.h5"],
     "--early-stop needs validation data: add --val-data FILE or --val-fraction F "
     "(--data 'd.h5' alone has none)"),
]


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_command_line_value_raises_config_error_naming_the_option(argv, expected):
    message = config_error(*argv)
    assert message.startswith(expected)
    assert argv[0] in message and "(in " not in message


# (TOML text, message fragment): wrong types and the same range checks, from a file
TOML_CASES = [
    ("lr = -0.1", "--lr must be a positive number, got -0.1"),
    ('lr = "abc"', "--lr must be a number, got string 'abc'"),
    ("lr = nan", "--lr must be a positive number, got nan"),
    ("batch_size = true", "--batch-size must be an integer, got boolean true"),
    ('batch_size = "64"', "--batch-size must be an integer, got string '64'"),
    ("batch_size = 2.5", "--batch-size must be an integer, got 2.5"),
    ("batch_size = 0", "--batch-size must be a positive integer, got 0"),
    ("epochs = [1, 2]", "--epochs must be an integer, got array [1, 2]"),
    ('drop_last = "yes"', "--drop-last must be true or false, got string 'yes'"),
    ("data = 5", "--data must be a string, got 5"),
    ("activation = 3", "--activation must be a string, got 3"),
    ('optimizer = "rmsprop"', "--optimizer must be one of sgd, adam, adamw, got 'rmsprop'"),
    ("momentum = 1.5", "--momentum must be a number in [0, 1), got 1.5"),
    ('layers = [64, "a", 10]', "--layers must be an array of integers like [784, 128, 10]"),
    ("layers = [64, 0, 10]", "--layers: every layer needs at least one unit, got 64,0,10"),
    ("scale = 0.0", "--scale must be a positive number, got 0.0"),
    ("nesterov = true\nmomentum = 0.0", "--nesterov needs --momentum > 0"),
    ('schedule = "step"', "--schedule step needs --lr-step-size"),
    ('val_data = "v.h5"\nval_fraction = 0.1', "--val-data and --val-fraction are mutually"),
    ("[train]\nlr = 0.1", "unknown key 'train'"),
    ("clip_grad_norm = 0", "--clip-grad-norm must be a positive number, got 0.0"),
    ('early_stop = "3"', "--early-stop must be an integer, got string '3'"),
    ("early_stop = 0", "--early-stop must be a positive integer, got 0"),
    ("early_stop_min_delta = -1", "--early-stop-min-delta must be a non-negative number"),
    ('data = "d.h5"\nearly_stop = 2', "--early-stop needs validation data"),
]


@pytest.mark.parametrize(("text", "expected"), TOML_CASES, ids=[t for t, _ in TOML_CASES])
def test_bad_toml_value_raises_config_error_naming_option_and_file(tmp_path, text, expected):
    path = write_toml(tmp_path, text + "\n")
    message = config_error("--config", path)
    assert expected in message
    assert f"config file '{path}'" in message


def test_same_message_from_command_line_and_file_apart_from_the_file_name(tmp_path):
    path = write_toml(tmp_path, "keep = 0\n")
    from_file = config_error("--config", path)
    assert from_file == config_error("--keep", "0") + f" (in config file '{path}')"


def test_unknown_key_suggests_the_closest_option(tmp_path):
    path = write_toml(tmp_path, "batchsize = 32\n")
    assert config_error("--config", path) == (
        f"unknown key 'batchsize' in config file '{path}' (did you mean 'batch_size'?)")
    path = write_toml(tmp_path, "warmup-steps = 5\n", "dash.toml")
    assert "(did you mean 'warmup_steps'?)" in config_error("--config", path)
    path = write_toml(tmp_path, "zzzz = 1\n", "far.toml")
    assert config_error("--config", path) == f"unknown key 'zzzz' in config file '{path}'"


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = write_toml(tmp_path, "# comment\nlr = 0.1\nbatch_size = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    message = str(info.value)
    assert message.startswith(f"config file '{path}': invalid TOML: ")
    assert "(line 3" in message and "\n" not in message
    assert config_error("--config", path) == message


def test_missing_config_file_and_unknown_preset_are_config_errors(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert config_error("--config", missing).startswith(f"config file '{missing}': cannot read")
    message = config_error("--preset", "imagenet")
    assert "unknown preset 'imagenet'" in message and "digits" in message


def test_to_dict_from_dict_round_trip_through_json():
    cfg = TrainConfig(layers=(64, 32, 10), lr=0.25, momentum=0.9, nesterov=True, steps=7,
                      check_every=None, collective_timeout=None, scale=0.0625, data="d.h5",
                      resume="auto", lr_reference_batch=256)
    d = cfg.to_dict()
    assert d["layers"] == [64, 32, 10] and set(d) == {f.name for f in dataclasses.fields(cfg)}
    back = TrainConfig.from_dict(json.loads(json.dumps(d)), "checkpoint 'c.h5'")
    assert back == cfg and back.layers == (64, 32, 10) and back.betas == (0.9, 0.999)
    adam = TrainConfig(optimizer="adam", betas=(0.8, 0.99), eps=1e-6)
    assert TrainConfig.from_dict(json.loads(json.dumps(adam.to_dict())), "c") == adam


def test_from_dict_rejects_unknown_keys_and_bad_values_naming_the_source():
    with pytest.raises(ConfigError, match=r"unknown key 'lrate' in checkpoint 'c.h5'"):
        TrainConfig.from_dict({"lrate": 0.1}, "checkpoint 'c.h5'")
    with pytest.raises(ConfigError, match=r"--keep must be .* \(in checkpoint 'c.h5'\)"):
        TrainConfig.from_dict({"keep": -1}, "checkpoint 'c.h5'")
    assert TrainConfig.from_dict({}, "x") == TrainConfig()


def test_config_is_frozen_and_replace_makes_a_changed_copy():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5  # type: ignore[misc]
    changed = dataclasses.replace(cfg, lr=0.5, steps=100)
    assert (changed.lr, changed.steps, cfg.lr, cfg.steps) == (0.5, 100, 0.1, None)
    validate(changed)
    with pytest.raises(ConfigError, match="--lr must be a positive number"):
        validate(dataclasses.replace(cfg, lr=-1.0))


def test_every_field_has_help_text_and_exactly_one_long_option():
    parser = train_parser()
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(options) == set(names) | {"config", "preset"}
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata["help"]) > 10, f.name
        assert f"--{f.name.replace('_', '-')}" in options[f.name].option_strings
        assert options[f.name].default is argparse.SUPPRESS
    text = parser.format_help()  # raises if any help text breaks argparse's %-formatting
    assert "--batch-size" in text and "--no-drop-last" in text


def test_nesterov_flag_and_its_negation_override_a_file(tmp_path):
    parser = train_parser()
    assert "nesterov" not in vars(parser.parse_args([]))
    assert parser.parse_args(["--nesterov"]).nesterov is True
    assert parser.parse_args(["--no-nesterov"]).nesterov is False
    path = write_toml(tmp_path, "nesterov = true\n")
    assert resolve("--config", path).nesterov is True
    assert resolve("--config", path, "--no-nesterov").nesterov is False


@pytest.mark.parametrize("module", ["config.py", "config_schema.py", "config_values.py",
                                    "config_rules.py"])
def test_config_modules_import_only_the_standard_library_and_errors(module):
    source = Path(__file__).resolve().parents[1] / "distbp" / module
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"__future__", "argparse", "dataclasses", "difflib", "math", "os", "re",
                        "sys", "collections.abc", "pathlib", "typing", "tomllib", "tomli",
                        "distbp.errors", "distbp.paths", "distbp.config_schema",
                        "distbp.config_values", "distbp.config_rules"}


def test_config_modules_import_no_private_name_of_each_other():
    for module in ("config.py", "config_schema.py"):
        source = Path(__file__).resolve().parents[1] / "distbp" / module
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("distbp"):
                assert not [a.name for a in node.names if a.name.startswith("_")], module


def test_validate_type_checks_values_set_by_replace():
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match=r"^--batch-size must be an integer, got 2.5$"):
        validate(dataclasses.replace(cfg, batch_size=2.5))
    with pytest.raises(ConfigError, match=r"^--run-dir must be a string, got None$"):
        validate(dataclasses.replace(cfg, run_dir=None))


def test_momentum_is_refused_for_adam_instead_of_silently_ignored():
    message = config_error("--optimizer", "adam", "--momentum", "0.5", "--data", "d.h5")
    assert "--momentum applies to --optimizer sgd only" in message
    assert resolve("--optimizer", "adamw", "--data", "d.h5").momentum == 0.0

