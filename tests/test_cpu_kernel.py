"""The C++ selective scan (`cpu_kernel` mode): values and gradients against JAX's autodiff of the
plain loop, padding, the batch split over devices, and the build's errors."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm import cpu_kernel
from ssm.scan import selective_scan, sequential_scan_reference

REPOSITORY = Path(__file__).resolve().parents[1]


def random_inputs(batch, length, channels, states, seed=0, dt_max=0.5):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (batch, length, channels))
    dt = jax.random.uniform(keys[1], (batch, length, channels), minval=0.01, maxval=dt_max)
    A = -jax.random.uniform(keys[2], (channels, states), minval=0.5, maxval=4.0)
    B = jax.random.normal(keys[3], (batch, length, states))
    C = jax.random.normal(keys[4], (batch, length, states))
    h0 = jax.random.normal(keys[5], (batch, channels, states))
    return x, dt, A, B, C, h0


def weighted_loss(scan):
    def loss(*args):
        y, h_last = scan(*args)
        y_weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        h_weights = jnp.sin(jnp.arange(h_last.size, dtype=h_last.dtype)).reshape(h_last.shape)
        return jnp.sum(y * y_weights) + jnp.sum(h_last * h_weights)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))


def kernel_scan(x, dt, A, B, C, h0):
    return selective_scan(x, dt, A, B, C, h0=h0, mode="cpu_kernel")


# Channels that are and are not a multiple of the kernel's 16 lanes, state sizes that it runs
# as they are (16, 64, 1) and ones it pads (5), lengths within one kept-state interval of 16
# steps, on its boundary and past it with a partial last interval.
@pytest.mark.parametrize("batch, length, channels, states", [
    (2, 50, 40, 16),
    (1, 33, 16, 5),
    (2, 16, 48, 64),
    (3, 1, 7, 1),
])
def test_kernel_matches_autodiff_of_the_loop(batch, length, channels, states):
    args = random_inputs(batch, length, channels, states)

    value, gradients = weighted_loss(kernel_scan)(*args)
    expected_value, expected_gradients = weighted_loss(sequential_scan_reference)(*args)

    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, got, expected in zip("x dt A B C h0".split(), gradients, expected_gradients):
        assert float(jnp.abs(expected).max()) > 1e-3, f"gradient of {name} is zero"
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_kernel_forgets_the_state_where_the_decay_underflows():
    # dt * A down to -200: exp underflows in float32, so the state starts afresh at such steps.
    args = random_inputs(2, 40, 32, 16, seed=1, dt_max=50.0)

    y, h_last = kernel_scan(*args)
    expected_y, expected_h_last = sequential_scan_reference(*args)

    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, expected_h_last, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(weighted_loss(kernel_scan)(*args)[1][1])).all()


def test_kernel_rejects_state_size_above_64():
    args = random_inputs(1, 4, 16, 65)

    with pytest.raises(ValueError, match=r"state sizes up to 64, got 65.*'sequential'"):
        kernel_scan(*args)


def test_kernel_rejects_float64():
    previous_x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        args = tuple(jnp.asarray(a, jnp.float64) for a in random_inputs(1, 4, 16, 4))
        with pytest.raises(ValueError, match=r"'cpu_kernel' computes in float32, got float64"):
            kernel_scan(*args)
    finally:
        jax.config.update("jax_enable_x64", previous_x64)


TWO_DEVICE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Mesh
sys.path.insert(0, sys.argv[1])
from tests.test_cpu_kernel import kernel_scan, random_inputs, weighted_loss
assert jax.device_count() == 2
args = random_inputs(4, 37, 48, 16)
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, PartitionSpec("data"))
sharded = tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec())) if i == 2
                else jax.device_put(a, rows) for i, a in enumerate(args))
grad_fn = weighted_loss(kernel_scan)
hlo = grad_fn.lower(*sharded).compile().as_text()
assert "all-gather" not in hlo, "the batch was gathered onto every device"
calls = [line for line in hlo.splitlines() if "custom_call_target=" in line and "selective_scan" in line]
assert len(calls) == 2 and all("f32[2,37,48]" in line for line in calls), calls
(value, gradients), (expected_value, expected_gradients) = grad_fn(*sharded), grad_fn(*args)
np.testing.assert_allclose(value, expected_value, rtol=1e-5)
for got, expected in zip(gradients, expected_gradients):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_batch_sharded_over_two_devices_runs_each_half_on_its_device():
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                       JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT, str(REPOSITORY)],
                            capture_output=True, text=True, env=environment, timeout=300,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    folder = tmp_path / "kernel cache"
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(folder))
    return folder


def test_compiler_named_by_cxx_missing_is_named(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/no/such/compiler")

    with pytest.raises(cpu_kernel.KernelBuildError,
                       match=r"\$CXX, '/no/such/compiler', was not found.*'sequential'"):
        cpu_kernel.build()


def test_no_compiler_on_path_is_named(empty_cache, monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(cpu_kernel.KernelBuildError,
                       match=r"needs a C\+\+ compiler.*g\+\+, c\+\+, clang\+\+.*'sequential'"):
        cpu_kernel.build()


def test_failed_compilation_reports_the_compiler_and_leaves_no_library(empty_cache, monkeypatch,
                                                                       tmp_path):
    compiler = tmp_path / "failing-compiler"
    compiler.write_text("#!/bin/sh\necho 'selective_scan_cpu.cc:1: error: no vectors here' >&2\n"
                        "exit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))

    with pytest.raises(cpu_kernel.KernelBuildError, match=r"(?s)failed to build.*no vectors here"):
        cpu_kernel.build()
    assert list(empty_cache.iterdir()) == []


def test_build_is_cached_and_reused(empty_cache):
    library = cpu_kernel.build()
    built_at = library.stat().st_mtime_ns

    assert library.parent == empty_cache
    assert cpu_kernel.build() == library
    assert library.stat().st_mtime_ns == built_at
    assert [path.name for path in empty_cache.iterdir()] == [library.name]
