"""`distbp gradcheck`: the error measures, that it catches a wrong derivative, and the command."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import child_env, error_lines, run_py

from distbp import activations
from distbp.gradcheck import elementwise_relative_error, gradcheck, relative_error

DONE_WHEN = ["-m", "distbp", "gradcheck", "--layers", "784,30,10", "--activation", "sigmoid",
             "--output", "sigmoid", "--loss", "mse"]
WORST = re.compile(r"^worst normwise relative error (\S+) \(tolerance (\S+)\): (OK|FAIL)$", re.M)


def test_relative_error_is_normwise_difference_over_sum_of_norms():
    # ‖(3,4) − 0‖ = 5 over ‖(3,4)‖ + 0 = 5
    assert relative_error(np.array([3.0, 4.0]), np.zeros(2)) == 1.0
    # ‖(1,−1)‖ = √2 over 1 + 1
    assert relative_error(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(
        math.sqrt(2) / 2, rel=1e-15)
    # ‖(0, −0.5)‖ = 0.5 over 5 + √(9 + 20.25)
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(
        0.5 / (5 + math.sqrt(29.25)), rel=1e-15)
    # matrices: Frobenius norms. ‖(0,0,0,1)‖ = 1 over √(1+4+4+16) + √(1+4+4+25) = 5 + √34
    a, b = np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([[1.0, 2.0], [2.0, 5.0]])
    assert relative_error(a, b) == pytest.approx(1 / (5 + math.sqrt(34)), rel=1e-15)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.array([2.0, -1.0]), np.array([2.0, -1.0])) == 0.0


def test_elementwise_relative_error_is_the_worst_entry_with_a_floor():
    a, b = np.array([1.0, 1e-12, -2.0]), np.array([1.1, 0.0, -2.0])
    # entries: 0.1 / 1.1, 1e-12 / max(1e-12, 0, 1e-8) = 1e-4, 0 / 2
    assert elementwise_relative_error(a, b) == pytest.approx(0.1 / 1.1, rel=1e-14)
    # both below the floor: 2e-9 / 1e-8, not 2e-9 / 3e-9
    assert elementwise_relative_error(np.array([1e-9]), np.array([3e-9])) == pytest.approx(
        0.2, rel=1e-12)
    assert elementwise_relative_error(np.array([1e-9]), np.array([3e-9]), floor=0.0) == \
        pytest.approx(2 / 3, rel=1e-12)
    assert elementwise_relative_error(np.zeros(0), np.zeros(0)) == 0.0


def test_a_wrong_hidden_derivative_is_reported_in_the_layers_that_use_it(monkeypatch):
    def wrong_sigmoid_prime(z, a, out):
        np.copyto(out, a)  # σ(z) instead of σ′(z) = σ(z)(1 − σ(z))
        return out

    monkeypatch.setitem(activations.HIDDEN, "sigmoid",
                        activations.Activation(activations.sigmoid, wrong_sigmoid_prime))
    errors = {e.name: e for e in gradcheck([5, 4, 3], "sigmoid", "softmax", "cross_entropy",
                                           batch=6, seed=1)}
    # g′ of the hidden layer enters δ_1, so W1 and b1 are wrong; W2, b2 use only δ_L and a_1.
    assert errors["W1"].rel_error > 1e-3 and errors["b1"].rel_error > 1e-3
    assert errors["W2"].rel_error < 1e-7 and errors["b2"].rel_error < 1e-7


def test_correct_derivatives_pass_and_every_block_reports_three_measures():
    errors = gradcheck([5, 4, 3], "sigmoid", "softmax", "cross_entropy", batch=6, seed=1)
    assert [e.name for e in errors] == ["W1", "b1", "W2", "b2"]
    assert [e.size for e in errors] == [20, 4, 12, 3]
    for e in errors:
        assert 0 <= e.rel_error < 1e-7 and 0 <= e.max_abs_error < 1e-8
        assert e.max_elem_rel_error >= 0


def test_done_when_command_passes_below_1e_minus_7():
    r = run_py(DONE_WHEN, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "normwise rel error" in r.stdout and "max elementwise rel error" in r.stdout
    blocks = [line.split()[0] for line in r.stdout.splitlines()[2:6]]
    assert blocks == ["W1", "b1", "W2", "b2"]
    m = WORST.search(r.stdout)
    assert m, r.stdout
    worst, tolerance, verdict = float(m.group(1)), float(m.group(2)), m.group(3)
    assert worst < 1e-7 and tolerance == 1e-7 and verdict == "OK"


def test_error_above_tolerance_exits_1():
    # Central differences in float64 leave errors around 1e-9, far above 1e-12.
    r = run_py(["-m", "distbp", "gradcheck", "--layers", "6,4,3", "--tolerance", "1e-12"])
    assert r.returncode == 1, r.stdout + r.stderr
    m = WORST.search(r.stdout)
    assert m and float(m.group(1)) > 1e-12 and m.group(3) == "FAIL", r.stdout


@pytest.mark.parametrize("flags,phrase", [
    (["--batch", "0"], "argument --batch: must be an integer from 1 to 65536, got '0'"),
    (["--batch", "-3"], "argument --batch: must be an integer from 1 to 65536, got '-3'"),
    (["--batch", "100000"], "argument --batch: must be an integer from 1 to 65536"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 9223372036854775807"),
    (["--seed", str(2**63)], "argument --seed: must be an integer from 0 to"),
    (["--eps", "0"], "argument --eps: must be a finite number > 0, got '0'"),
    (["--eps=-1e-6"], "argument --eps: must be a finite number > 0, got '-1e-6'"),
    (["--eps", "nan"], "argument --eps: must be a finite number > 0, got 'nan'"),
    (["--tolerance=-1e-7"], "argument --tolerance: must be a finite number >= 0, got '-1e-7'"),
    (["--eps", "1e308"], "argument --eps: must be at most 1, got '1e308'"),
    (["--layers", "4,3000000000,2"], "needs about"),
    (["--layers", "3,2.5,2"], "--layers must be comma-separated integers"),
    (["--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
    (["--output", "tanh"], "argument --output: invalid choice: 'tanh'"),
    (["--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_option(flags, phrase):
    r = run_py(["-m", "distbp", "gradcheck", "--layers", "4,3,2", *flags], timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and phrase in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_help_shows_every_choice_and_default():
    r = run_py(["-m", "distbp", "gradcheck", "--help"], timeout=60, env=child_env(COLUMNS="200"))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for shown in ("--activation {sigmoid,tanh,relu,leaky_relu,identity}", "(default sigmoid)",
                  "--output {softmax,sigmoid,identity}", "(default softmax)",
                  "--loss {cross_entropy,mse}", "(default cross_entropy)", "(default 0)",
                  "(default 784,30,10)", "(default 1e-6)"):
        assert shown in text, shown
