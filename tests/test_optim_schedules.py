"""LR schedules (constant, warmup, step, cosine) and linear scaling against formulas written out
here, and building optimizers: make_optimizer by name, argument validation with one-line
messages naming the field, the names logs and checkpoints use.

The update rules themselves: tests/test_optim.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from distbp.errors import ConfigError
from distbp.optim import SGD, Adam, Schedule, linear_scaling, make_optimizer

pytestmark = pytest.mark.usefixtures("strict_numpy")


# ---- make_optimizer ------------------------------------------------------------------------

def test_make_optimizer_builds_each_named_optimizer():
    assert make_optimizer("sgd", momentum=0.9, nesterov=True) == SGD(0.9, True)
    assert make_optimizer("sgd", weight_decay=0.1) == SGD(weight_decay=0.1)
    assert make_optimizer("adam", beta1=0.8, eps=1e-6) == Adam(beta1=0.8, eps=1e-6)
    assert make_optimizer("adam", weight_decay=0.1) == Adam(weight_decay=0.1)
    assert make_optimizer("adamw", weight_decay=0.1) == Adam(weight_decay=0.1, decoupled=True)


def test_sgd_has_only_l2_weight_decay_as_in_pytorch():
    with pytest.raises(TypeError):
        make_optimizer("sgd", weight_decay=0.1, decoupled=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SGD(0.9, False, 0.1, True)  # type: ignore[call-arg]


def test_make_optimizer_unknown_name_lists_the_valid_names():
    with pytest.raises(ConfigError, match="'rmsprop'.*sgd, adam, adamw"):
        make_optimizer("rmsprop")


@pytest.mark.parametrize("name, kwargs, field", [
    ("adam", {"momentum": 0.9}, "momentum"),
    ("adamw", {"nesterov": True}, "nesterov"),
    ("sgd", {"beta1": 0.5}, "beta1"),
    ("sgd", {"eps": 1e-6}, "eps"),
])
def test_make_optimizer_rejects_options_of_the_other_optimizer(name, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        make_optimizer(name, **kwargs)


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("build, field", [
    (lambda: SGD(momentum=-0.1), "momentum"),
    (lambda: SGD(momentum=1.0), "momentum"),
    (lambda: SGD(momentum=float("nan")), "momentum"),
    (lambda: SGD(weight_decay=-1e-4), "weight_decay"),
    (lambda: SGD(nesterov=True), "nesterov"),
    (lambda: Adam(beta1=1.0), "beta1"),
    (lambda: Adam(beta1=-0.1), "beta1"),
    (lambda: Adam(beta2=1.0), "beta2"),
    (lambda: Adam(eps=0.0), "eps"),
    (lambda: Adam(weight_decay=-1.0, decoupled=True), "weight_decay"),
    (lambda: Schedule(base_lr=0.0), "base_lr"),
    (lambda: Schedule(base_lr=-0.1), "base_lr"),
    (lambda: Schedule(base_lr=float("inf")), "base_lr"),
    (lambda: Schedule(0.1, kind="linear"), "kind"),
    (lambda: Schedule(0.1, warmup_steps=-1), "warmup_steps"),
    (lambda: Schedule(0.1, warmup_steps=2.5), "warmup_steps"),
    (lambda: Schedule(0.1, kind="cosine"), "total_steps"),
    (lambda: Schedule(0.1, kind="cosine", total_steps=10, warmup_steps=10), "total_steps"),
    (lambda: Schedule(0.1, total_steps=0), "total_steps"),
    (lambda: Schedule(0.1, kind="step"), "step_size"),
    (lambda: Schedule(0.1, kind="step", step_size=0), "step_size"),
    (lambda: Schedule(0.1, gamma=0.0), "gamma"),
    (lambda: Schedule(0.1, gamma=-0.5), "gamma"),
    (lambda: Schedule(0.1, min_lr=-0.01), "min_lr"),
    (lambda: Schedule(0.1, min_lr=0.2), "min_lr"),
    (lambda: linear_scaling(0.0, 256, 64), "lr"),
    (lambda: linear_scaling(0.1, 0, 64), "global_batch"),
    (lambda: linear_scaling(0.1, 256, 0), "reference_batch"),
])
def test_invalid_argument_raises_config_error_naming_the_field(build, field):
    with pytest.raises(ConfigError, match=field) as info:
        build()
    assert "\n" not in str(info.value)


# ---- schedules -----------------------------------------------------------------------------

def test_constant_schedule_is_base_lr_at_every_step():
    schedule = Schedule(0.05)
    assert [schedule.lr_at(s) for s in (0, 1, 10, 10_000)] == [0.05] * 4


def test_warmup_rises_linearly_to_base_lr_then_holds():
    schedule = Schedule(0.4, warmup_steps=4)
    got = [schedule.lr_at(s) for s in range(7)]
    want = [0.4 * 1 / 4, 0.4 * 2 / 4, 0.4 * 3 / 4, 0.4, 0.4, 0.4, 0.4]
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_step_schedule_multiplies_by_gamma_every_step_size_steps_after_warmup():
    schedule = Schedule(1.0, kind="step", warmup_steps=2, step_size=3, gamma=0.5)
    got = [schedule.lr_at(s) for s in range(12)]
    want = [0.5, 1.0] + [1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.125]
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_cosine_schedule_follows_the_half_cosine_from_base_to_min_lr():
    base, floor, warmup, total = 0.1, 0.01, 5, 25
    schedule = Schedule(base, kind="cosine", warmup_steps=warmup, total_steps=total,
                        min_lr=floor)
    for s in (5, 6, 10, 15, 20, 24, 25, 40):
        progress = min(s - warmup, total - warmup) / (total - warmup)
        want = floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * progress))
        assert schedule.lr_at(s) == pytest.approx(want, rel=1e-12), s
    assert schedule.lr_at(2) == pytest.approx(base * 3 / warmup, rel=1e-15)
    assert schedule.lr_at(warmup) == pytest.approx(base, rel=1e-15)
    assert schedule.lr_at(15) == pytest.approx((base + floor) / 2, rel=1e-12)
    assert schedule.lr_at(total) == pytest.approx(floor, rel=1e-12)
    assert schedule.lr_at(10 * total) == pytest.approx(floor, rel=1e-12)


def test_lr_at_rejects_negative_steps():
    with pytest.raises(ValueError, match="step"):
        Schedule(0.1).lr_at(-1)


def test_linear_scaling_multiplies_lr_by_global_over_reference_batch():
    assert linear_scaling(0.1, 1024, 256) == pytest.approx(0.1 * 4, rel=1e-15)
    assert linear_scaling(0.1, 64, 256) == pytest.approx(0.1 / 4, rel=1e-15)
    assert linear_scaling(0.3, 256, 256) == 0.3


def test_adamw_is_named_adamw_in_logs_and_checkpoints():
    assert make_optimizer("adamw").name == "adamw"
    assert make_optimizer("adam").name == "adam" and make_optimizer("sgd").name == "sgd"
