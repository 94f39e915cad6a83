"""Optimizers against references written out by hand, element by element: the update rules,
state restored as from a checkpoint, dtypes, and updates in place without allocation.

The references below never call distbp.optim: they loop over elements with scalars of the
parameters' dtype, performing the same operations in the order the docstrings state, so the
vectorised in-place code must match them bitwise in float32 and float64.

LR schedules and building optimizers by name: tests/test_optim_schedules.py.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from distbp.optim import SGD, Adam

pytestmark = pytest.mark.usefixtures("strict_numpy")

DTYPES = [np.float32, np.float64]
LRS = [0.1, 0.05, 0.02, 0.3, 0.01]

SGD_VARIANTS = {
    "plain": {"momentum": 0.0},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "l2": {"momentum": 0.9, "weight_decay": 0.01},
    "l2_nesterov": {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05},
    "l2_plain": {"weight_decay": 0.1},
}
ADAM_VARIANTS = {
    "adam": {},
    "adam_l2": {"weight_decay": 0.01},
    "adamw": {"weight_decay": 0.01, "decoupled": True},
    "adam_betas": {"beta1": 0.5, "beta2": 0.9, "eps": 1e-3},
}


def problem(dtype, n=7, steps=5, seed=0):
    """Initial weights and one gradient per step, all of `dtype`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    return w, grads


def reference_sgd(w, grads, lrs, momentum=0.0, nesterov=False, weight_decay=0.0):
    """SGD by hand: per element, per step, scalars of w's dtype."""
    dt = w.dtype.type
    mu, lam = dt(momentum), dt(weight_decay)
    w = [dt(x) for x in w]
    v = [dt(0.0)] * len(w)
    for grad, lr in zip(grads, lrs):
        for i in range(len(w)):
            g = grad[i]
            if weight_decay:
                g = g + lam * w[i]
            u = g
            if momentum:
                v[i] = mu * v[i] + g
                u = g + mu * v[i] if nesterov else v[i]
            w[i] = w[i] - dt(lr) * u
    return np.array(w), np.array(v)


def reference_adam(w, grads, lrs, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   decoupled=False):
    """Adam by hand: per element, per step, scalars of w's dtype."""
    dt = w.dtype.type
    w = [dt(x) for x in w]
    m = [dt(0.0)] * len(w)
    v = [dt(0.0)] * len(w)
    for t, (grad, lr) in enumerate(zip(grads, lrs), start=1):
        for i in range(len(w)):
            if weight_decay and decoupled:
                w[i] = w[i] * dt(1.0 - lr * weight_decay)
            g = grad[i]
            if weight_decay and not decoupled:
                g = g + dt(weight_decay) * w[i]
            m[i] = dt(beta1) * m[i] + dt(1.0 - beta1) * g
            v[i] = dt(beta2) * v[i] + dt(1.0 - beta2) * (g * g)
            m_hat = m[i] / dt(1.0 - beta1 ** t)
            v_hat = v[i] / dt(1.0 - beta2 ** t)
            w[i] = w[i] - dt(lr) * (m_hat / (np.sqrt(v_hat) + dt(eps)))
    return np.array(w), np.array(m), np.array(v)


def run(opt, w, grads, lrs, state=None):
    """Apply opt to a copy of w for each (grad, lr); return (params, state)."""
    params = w.copy()
    state = opt.init(params) if state is None else state
    for grad, lr in zip(grads, lrs):
        opt.step(params, grad, state, lr)
    return params, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
def test_sgd_matches_hand_written_update_bitwise(variant, dtype):
    kwargs = SGD_VARIANTS[variant]
    w, grads = problem(dtype)
    params, state = run(SGD(**kwargs), w, grads, LRS)
    want_w, want_v = reference_sgd(w, grads, LRS, **kwargs)
    assert params.dtype == dtype
    np.testing.assert_array_equal(params, want_w)
    if kwargs.get("momentum"):
        np.testing.assert_array_equal(state["velocity"], want_v)
    else:
        assert "velocity" not in state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(ADAM_VARIANTS))
def test_adam_matches_hand_written_update_bitwise(variant, dtype):
    kwargs = ADAM_VARIANTS[variant]
    w, grads = problem(dtype)
    params, state = run(Adam(**kwargs), w, grads, LRS)
    want_w, want_m, want_v = reference_adam(w, grads, LRS, **kwargs)
    assert params.dtype == dtype
    np.testing.assert_array_equal(params, want_w)
    np.testing.assert_array_equal(state["m"], want_m)
    np.testing.assert_array_equal(state["v"], want_v)
    assert state["step"].shape == () and state["step"].dtype == np.int64
    assert int(state["step"]) == len(LRS)


def test_plain_sgd_first_step_is_w_minus_lr_times_grad_in_float64():
    w = np.array([1.0, -2.0, 0.5])
    g = np.array([0.25, 0.5, -1.0])
    params, _ = run(SGD(), w, [g], [0.1])
    np.testing.assert_allclose(params, [1.0 - 0.025, -2.0 - 0.05, 0.5 + 0.1], rtol=1e-12)


def test_adam_first_step_moves_each_weight_by_about_lr_against_the_gradient_sign():
    # With bias correction, step 1 gives m̂ = g and v̂ = g², so Δw = −α·g/(|g| + ε).
    w = np.array([1.0, -2.0, 0.5])
    g = np.array([0.25, 0.5, -1.0])
    params, _ = run(Adam(), w, [g], [0.01])
    np.testing.assert_allclose(params, w - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)


OPTIMIZERS = [SGD(**kw) for kw in SGD_VARIANTS.values()] + [Adam(**kw)
                                                            for kw in ADAM_VARIANTS.values()]


def persistent(state):
    """What a checkpoint stores: copies of every array not under a scratch ("_") key."""
    return {k: np.array(v, copy=True) for k, v in state.items() if not k.startswith("_")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_restored_state_continues_bitwise_identically(opt, dtype):
    w, grads = problem(dtype, steps=6)
    lrs = LRS + [0.07]
    params, state = run(opt, w, grads[:3], lrs[:3])
    saved_params, saved_state = params.copy(), persistent(state)
    params, state = run(opt, params, grads[3:], lrs[3:], state)
    # A fresh optimizer object and a state without scratch, as after loading a checkpoint.
    restored = dataclasses.replace(opt)
    again, state_again = run(restored, saved_params, grads[3:], lrs[3:], saved_state)
    np.testing.assert_array_equal(again, params)
    assert persistent(state_again).keys() == persistent(state).keys()
    for key, value in persistent(state).items():
        np.testing.assert_array_equal(state_again[key], value)
        assert state_again[key].dtype == value.dtype


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_float32_params_and_state_stay_float32(opt):
    w, grads = problem(np.float32)
    params, state = run(opt, w, grads, LRS)
    assert params.dtype == np.float32
    for key, value in state.items():
        assert value.dtype == (np.int64 if key == "step" else np.float32), key


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_float64_numpy_scalar_lr_does_not_change_float32_arithmetic(opt):
    w, grads = problem(np.float32)
    with_python_float, _ = run(opt, w, grads, LRS)
    with_numpy_float64, _ = run(opt, w, grads, [np.float64(lr) for lr in LRS])
    np.testing.assert_array_equal(with_numpy_float64, with_python_float)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_step_leaves_grad_untouched(opt):
    w, grads = problem(np.float64)
    before = [g.copy() for g in grads]
    run(opt, w, grads, LRS)
    for g, g0 in zip(grads, before):
        np.testing.assert_array_equal(g, g0)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_that_may_spend_grad_gives_the_same_bits(opt, dtype):
    """spend_grad lets plain SGD form α·Δw in grad itself (the trainer's reduced buffer, which
    it no longer needs): the parameters and state are bitwise those of the read-only step."""
    w, grads = problem(dtype)
    kept, spent = w.copy(), w.copy()
    kept_state, spent_state = opt.init(kept), opt.init(spent)
    for g, lr in zip(grads, LRS):
        opt.step(kept, g, kept_state, lr)
        opt.step(spent, g.copy(), spent_state, lr, spend_grad=True)
        np.testing.assert_array_equal(spent, kept)
    for key, value in spent_state.items():
        if not key.startswith("_"):
            np.testing.assert_array_equal(value, kept_state[key])


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_steps_after_the_first_keep_every_state_array_in_place(opt):
    w, grads = problem(np.float64)
    params = w.copy()
    state = opt.init(params)
    opt.step(params, grads[0], state, 0.1)
    ids = {k: id(v) for k, v in state.items()}
    params_id = id(params)
    for g in grads[1:]:
        opt.step(params, g, state, 0.1)
        assert {k: id(v) for k, v in state.items()} == ids
    assert id(params) == params_id


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_steps_after_the_first_allocate_far_less_than_one_parameter_vector(opt):
    n = 100_000
    w, grads = problem(np.float64, n=n, steps=4)
    params = w.copy()
    state = opt.init(params)
    opt.step(params, grads[0], state, 0.1)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for g in grads[1:]:
            opt.step(params, g, state, 0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start < 8 * n // 50       # one vector would be 8n bytes; allow 2 % of it


def test_tracemalloc_sees_numpy_allocations_so_the_bound_above_is_meaningful():
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        buf = np.empty(100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start >= buf.nbytes


def test_init_state_shapes_and_keys():
    params = np.zeros(5, dtype=np.float32)
    assert SGD().init(params) == {}
    assert SGD(momentum=0.5).init(params)["velocity"].shape == (5,)
    state = Adam().init(params)
    assert sorted(state) == ["m", "step", "v"]
    assert state["m"].shape == state["v"].shape == (5,)
    assert int(state["step"]) == 0


def test_adam_step_count_restored_as_numpy_scalar_keeps_counting():
    # h5py reads a 0-d dataset back as a numpy scalar, not a 0-d array; the count must still work.
    w, grads = problem(np.float64)
    want, state = run(Adam(), w, grads, LRS)
    params, state = run(Adam(), w, grads[:2], LRS[:2])
    restored = persistent(state)
    restored["step"] = np.int64(restored["step"])
    got, restored = run(Adam(), params, grads[2:], LRS[2:], restored)
    np.testing.assert_array_equal(got, want)
    assert int(restored["step"]) == len(LRS)
