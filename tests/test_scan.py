"""Selective scan: the four implementations against each other and against a plain numpy loop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ssm.scan import (
    SCAN_MODES,
    combine_linear_recurrence,
    selective_scan,
    sequential_scan_reference,
)

LENGTHS = (1, 2, 3, 37, 64, 100)
CHUNK_SIZE = 8  # divides 64 but not 37 or 100, and exceeds 1, 2 and 3
BATCH, EXPANDED, STATE = 2, 3, 4


def reference_scan(x, dt, A, B, C, h0):
    """The recurrence written out as a Python loop over time, in float64 numpy."""
    x, dt, A, B, C, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, h0))
    h = h.copy()
    ys = []
    for t in range(x.shape[1]):
        decay = np.exp(dt[:, t, :, None] * A)
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return np.stack(ys, axis=1), h


def random_inputs(length, dtype, seed=0, batch=BATCH, expanded=EXPANDED, state=STATE):
    """Return x, dt, A, B, C, h0 with dt in [0.01, 0.5] and A negative.

    The arrays are float64 numpy, rounded to `dtype` first, so the float64 reference gets
    exactly the values that the scan gets.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, expanded))
    dt = rng.uniform(0.01, 0.5, size=(batch, length, expanded))
    A = -rng.uniform(0.5, 4.0, size=(expanded, state))
    B = rng.normal(size=(batch, length, state))
    C = rng.normal(size=(batch, length, state))
    h0 = rng.normal(size=(batch, expanded, state))
    return tuple(np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)
                 for a in (x, dt, A, B, C, h0))


@functools.partial(jax.jit, static_argnames=("mode",))
def scan_with_and_without_h0(x, dt, A, B, C, h0, *, mode):
    without = selective_scan(x, dt, A, B, C, mode=mode, chunk_size=CHUNK_SIZE)
    with_h0 = selective_scan(x, dt, A, B, C, h0=h0, mode=mode, chunk_size=CHUNK_SIZE)
    return without, with_h0


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", SCAN_MODES)
def test_scan_matches_python_loop(mode, dtype, length):
    # Given inputs in `dtype`, with and without an initial state.
    x, dt, A, B, C, h0 = random_inputs(length, dtype)
    args = [jnp.asarray(a, dtype) for a in (x, dt, A, B, C, h0)]

    # When the scan runs.
    (y, h_last), (y_h0, h_last_h0) = scan_with_and_without_h0(*args, mode=mode)

    # Then y has the input dtype, the state is float32, and both match the float64 loop.
    # y is rounded to bfloat16 once at the end (8 bits of mantissa), the state never is.
    y_tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for got_y, got_h, start in ((y, h_last, np.zeros_like(h0)), (y_h0, h_last_h0, h0)):
        expected_y, expected_h = reference_scan(x, dt, A, B, C, start)
        assert got_y.dtype == dtype
        assert got_y.shape == (BATCH, length, EXPANDED)
        assert got_h.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got_y, np.float64), expected_y,
                                   rtol=y_tolerance, atol=y_tolerance)
        np.testing.assert_allclose(np.asarray(got_h), expected_h, rtol=1e-5, atol=1e-5)


def test_scan_implementations_agree_with_each_other():
    x, dt, A, B, C, h0 = (jnp.asarray(a, jnp.float32) for a in random_inputs(37, jnp.float32))
    results = {mode: scan_with_and_without_h0(x, dt, A, B, C, h0, mode=mode)
               for mode in SCAN_MODES}

    for mode in SCAN_MODES:
        for index in range(2):
            for got, expected in zip(results[mode][index], results["sequential"][index]):
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_chunk_longer_than_sequence_unpadded():
    x, dt, A, B, C, h0 = (jnp.asarray(a, jnp.float32) for a in random_inputs(37, jnp.float32))
    huge = 10**9
    y, h_last = selective_scan(x, dt, A, B, C, h0=h0, mode="chunked", chunk_size=huge)
    expected_y, expected_h = reference_scan(x, dt, A, B, C, h0)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, expected_h, rtol=1e-5, atol=1e-5)
    # No array of the computation is padded towards the chunk size.
    jaxpr = jax.make_jaxpr(functools.partial(selective_scan, mode="chunked", chunk_size=huge))(
        x, dt, A, B, C, h0=h0)
    shapes = [var.aval.shape for equation in jaxpr.jaxpr.eqns for var in equation.outvars]
    assert max(max(shape, default=0) for shape in shapes) <= 37


def test_scan_hand_computed_case():
    # Given decay 0.5 (dt = 1, A = -ln 2) and inputs dt * B * x = [1, 2, 3, 4] with C = 1.
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    dt = jnp.ones((1, 4, 1))
    A = jnp.full((1, 1), -math.log(2.0))
    B = jnp.ones((1, 4, 1))
    C = jnp.ones((1, 4, 1))
    expected_states = [1.0, 2.5, 4.25, 6.125]

    for mode in SCAN_MODES:
        y, h_last = selective_scan(x, dt, A, B, C, mode=mode, chunk_size=3)
        np.testing.assert_allclose(y[0, :, 0], expected_states, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(h_last[0, 0, 0], 6.125, rtol=1e-6, err_msg=mode)


def test_combine_operator_hand_computed_case():
    decays = jnp.full((4,), 0.5)
    inputs = jnp.asarray([1.0, 2.0, 3.0, 4.0])

    _, states = jax.lax.associative_scan(combine_linear_recurrence, (decays, inputs))

    np.testing.assert_allclose(states, [1.0, 2.5, 4.25, 6.125], rtol=1e-6)


def weighted_sum(y, h_last):
    """A scalar that depends on every output and on the final state, with uneven weights."""
    y_weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    h_weights = jnp.sin(jnp.arange(h_last.size, dtype=h_last.dtype)).reshape(h_last.shape)
    return jnp.sum(y * y_weights) + jnp.sum(h_last * h_weights)


def scan_loss(x, dt, A, B, C, h0, *, mode, chunk_size=CHUNK_SIZE):
    return weighted_sum(*selective_scan(x, dt, A, B, C, h0=h0, mode=mode, chunk_size=chunk_size))


def reference_loss(x, dt, A, B, C, h0):
    return weighted_sum(*sequential_scan_reference(x, dt, A, B, C, h0))


# The sequential scan keeps its state every 32 steps: 21 steps fit in one interval, 70 span three
# and the last one is padded.
@pytest.mark.parametrize("length", [21, 70])
def test_scan_gradients_match_autodiff_reference(length):
    args = tuple(jnp.asarray(a, jnp.float32) for a in random_inputs(length, jnp.float32, seed=1))
    argnums = tuple(range(6))
    grad_fn = jax.jit(jax.grad(scan_loss, argnums=argnums), static_argnames=("mode",))
    gradients = {mode: grad_fn(*args, mode=mode) for mode in SCAN_MODES}
    reference_gradients = jax.jit(jax.grad(reference_loss, argnums=argnums))(*args)

    names = ("x", "dt", "A", "B", "C", "h0")
    for name, reference in zip(names, reference_gradients):
        assert float(jnp.abs(reference).max()) > 1e-3, f"gradient of {name} is zero"
    for mode in SCAN_MODES:
        for name, got, expected in zip(names, gradients[mode], reference_gradients):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{mode}: gradient of {name}")


def test_sequential_scan_values_match_autodiff_reference():
    x, dt, A, B, C, h0 = (jnp.asarray(a, jnp.float32) for a in random_inputs(70, jnp.float32))

    y, h_last = selective_scan(x, dt, A, B, C, h0=h0, mode="sequential")
    expected_y, expected_h_last = sequential_scan_reference(x, dt, A, B, C, h0)

    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_last, expected_h_last, rtol=1e-6, atol=1e-6)


def test_scan_jvp_against_reference():
    args = tuple(jnp.asarray(a, jnp.float32) for a in random_inputs(37, jnp.float32, seed=2))
    tangents = tuple(jnp.asarray(a, jnp.float32) for a in random_inputs(37, jnp.float32, seed=3))
    _, (expected_dy, expected_dh) = jax.jvp(sequential_scan_reference, args, tangents)
    assert float(jnp.abs(expected_dy).max()) > 1e-3

    for mode in ("associative", "chunked"):
        def scan(*arrays, mode=mode):
            return selective_scan(*arrays[:5], h0=arrays[5], mode=mode, chunk_size=CHUNK_SIZE)
        _, (dy, dh) = jax.jvp(scan, args, tangents)
        np.testing.assert_allclose(dy, expected_dy, rtol=1e-4, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(dh, expected_dh, rtol=1e-4, atol=1e-5, err_msg=mode)

    # The sequential and cpu_kernel modes are jax.custom_vjp functions, which JAX cannot
    # differentiate in forward mode.
    for mode in ("sequential", "cpu_kernel"):
        def custom_vjp_scan(*arrays, mode=mode):
            return selective_scan(*arrays[:5], h0=arrays[5], mode=mode)
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(custom_vjp_scan, args, tangents)


# cpu_kernel computes in float32 only, where finite differences are too coarse; its gradients
# are held equal to the autodiff reference in test_scan_gradients_match_autodiff_reference.
@pytest.mark.parametrize("mode", [mode for mode in SCAN_MODES if mode != "cpu_kernel"])
def test_scan_gradients_match_finite_differences(mode):
    previous_x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        args = tuple(jnp.asarray(a, jnp.float64)
                     for a in random_inputs(5, jnp.float32, seed=2, batch=1, expanded=2, state=3))
        loss = jax.jit(functools.partial(scan_loss, mode=mode, chunk_size=2))

        assert loss(*args).dtype == jnp.float64
        check_grads(loss, args, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", previous_x64)


def test_scan_rejects_unknown_mode():
    args = tuple(jnp.asarray(a, jnp.float32) for a in random_inputs(3, jnp.float32))[:5]

    with pytest.raises(ValueError, match=r"scan mode.*associative.*sequential.*chunked.*'parallel'"):
        selective_scan(*args, mode="parallel")


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_scan_rejects_chunk_size_below_one(chunk_size):
    args = tuple(jnp.asarray(a, jnp.float32) for a in random_inputs(3, jnp.float32))[:5]

    with pytest.raises(ValueError, match=rf"chunk_size.*>= 1.*{chunk_size}"):
        selective_scan(*args, mode="chunked", chunk_size=chunk_size)


def test_scan_rejects_mismatched_shapes():
    x, dt, A, B, C, _ = (jnp.asarray(a, jnp.float32) for a in random_inputs(3, jnp.float32))

    with pytest.raises(ValueError, match=r"B and C must be \(b, t, n\)"):
        selective_scan(x, dt, A, B[:, :2], C)
    with pytest.raises(ValueError, match=r"h0 must be \(b, e, n\)"):
        selective_scan(x, dt, A, B, C, h0=jnp.zeros((1, 1, 1)))


@pytest.mark.parametrize("mode", ["chunked", "sequential", "cpu_kernel"])
def test_scan_gradient_memory_does_not_store_every_state(mode):
    expanded, state = 64, 64

    def scratch_bytes(length):
        args = (jnp.ones((1, length, expanded)), jnp.full((1, length, expanded), 0.1),
                -jnp.ones((expanded, state)), jnp.ones((1, length, state)),
                jnp.ones((1, length, state)))
        loss = functools.partial(scan_loss, h0=None, mode=mode, chunk_size=16)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # When the sequence grows from 256 to 1024 steps, one (1, t, e, n) float32 tensor grows by
    # 12 MiB. The scratch memory of the gradient must grow by less than half of that: only
    # (b, t, e) and (b, t, n) arrays and the states kept every 32 steps (16 for cpu_kernel) may
    # scale with the length.
    full_tensor_growth = (1024 - 256) * expanded * state * 4
    assert scratch_bytes(1024) - scratch_bytes(256) < full_tensor_growth / 2
