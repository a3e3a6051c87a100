"""The C++ selective scan (`cpu_kernel` mode): values and gradients against JAX's autodiff of the
plain loop and of the mixer's own JAX code, padding, the batch split over devices, and the
build's errors."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax
from flax import nnx

from ssm import MambaConfig, build_language_model, cpu_kernel
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


def weighted_loss(function):
    """Jit the value and the gradient with respect to every argument of a weighted sum of both
    outputs of `function`, with uneven weights."""
    def loss(*args):
        first, second = function(*args)
        first_weights = jnp.cos(jnp.arange(first.size, dtype=first.dtype)).reshape(first.shape)
        second_weights = jnp.sin(jnp.arange(second.size, dtype=second.dtype)).reshape(
            second.shape)
        return jnp.sum(first * first_weights) + jnp.sum(second * second_weights)

    def value_and_gradients(*args):
        return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)
    return jax.jit(value_and_gradients)


def kernel_scan(x, dt, A, B, C, h0):
    return selective_scan(x, dt, A, B, C, h0=h0, mode="cpu_kernel")


# Channels that are and are not a multiple of the kernel's 16 lanes. State sizes that it runs as
# they are (16, 64, 1) and one that it pads (5). Lengths within one kept-state interval of 16
# steps, on its boundary, and past it with a partial last interval.
@pytest.mark.parametrize("batch, length, channels, states", [
    (2, 50, 40, 16),
    (1, 33, 16, 5),
    (2, 16, 48, 64),
    (3, 1, 7, 1),
])
def test_kernel_matches_autodiff_reference(batch, length, channels, states):
    args = random_inputs(batch, length, channels, states)

    value, gradients = weighted_loss(kernel_scan)(*args)
    expected_value, expected_gradients = weighted_loss(sequential_scan_reference)(*args)

    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, got, expected in zip("x dt A B C h0".split(), gradients, expected_gradients):
        assert float(jnp.abs(expected).max()) > 1e-3, f"gradient of {name} is zero"
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)


def gated_reference(x, dt_raw, dt_bias, A, B, C, D, z, h0):
    """What `gated_selective_scan` computes, in the JAX operations of `ssm.mamba.MambaMixer`."""
    y, h_last = sequential_scan_reference(x, jax.nn.softplus(dt_raw + dt_bias), A, B, C, h0)
    return (y + D * x) * jax.nn.silu(z), h_last


def gated_inputs(batch, length, channels, states, seed=0, spread=3.0):
    x, _, A, B, C, h0 = random_inputs(batch, length, channels, states, seed=seed)
    keys = jax.random.split(jax.random.key(seed + 100), 4)
    dt_raw = spread * jax.random.normal(keys[0], (batch, length, channels))
    dt_bias = jax.random.uniform(keys[1], (channels,), minval=-7.0, maxval=-2.0)
    D = jax.random.normal(keys[2], (channels,))
    z = spread * jax.random.normal(keys[3], (batch, length, channels))
    return x, dt_raw, dt_bias, A, B, C, D, z, h0


@pytest.mark.parametrize("batch, length, channels, states", [
    (2, 50, 40, 16),
    (1, 33, 16, 5),
    (3, 1, 7, 1),
])
def test_gated_kernel_matches_mixer_math(batch, length, channels, states):
    args = gated_inputs(batch, length, channels, states)

    value, gradients = weighted_loss(cpu_kernel.gated_selective_scan)(*args)
    expected_value, expected_gradients = weighted_loss(gated_reference)(*args)

    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    names = "x dt_raw dt_bias A B C D z h0".split()
    for name, got, expected in zip(names, gradients, expected_gradients):
        assert float(jnp.abs(expected).max()) > 1e-3, f"gradient of {name} is zero"
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_gated_kernel_extreme_inputs():
    # Raw step sizes and gates from -90 to 90: the softplus is 0 or the input itself and the
    # SiLU 0 or z at the ends, and nothing overflows.
    args = list(gated_inputs(1, 64, 48, 4))
    extremes = jnp.linspace(-90.0, 90.0, 64 * 48).reshape(1, 64, 48)
    args[1], args[2], args[7] = extremes, jnp.zeros(48), extremes[:, ::-1]

    out, h_last = cpu_kernel.gated_selective_scan(*args)
    expected_out, expected_h_last = gated_reference(*args)
    _, gradients = weighted_loss(cpu_kernel.gated_selective_scan)(*args)

    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(h_last, expected_h_last, rtol=1e-5, atol=1e-4)
    assert all(np.isfinite(np.asarray(gradient)).all() for gradient in gradients)


def conv_reference(xz, kernel, bias, history):
    """What `causal_conv_silu` computes: the window sums of `ssm.mamba.CausalConv1d`, SiLU, z."""
    width, channels = kernel.shape
    length = xz.shape[1]
    window = jnp.concatenate([history, xz[..., :channels]], axis=1)
    pre = bias + sum(window[:, j:j + length] * kernel[j] for j in range(width))
    return jax.nn.silu(pre), xz[..., channels:]


def conv_inputs(batch, length, channels, width, seed=0):
    keys = jax.random.split(jax.random.key(seed + 200), 4)
    return (jax.random.normal(keys[0], (batch, length, 2 * channels)),
            jax.random.normal(keys[1], (width, channels)),
            jax.random.normal(keys[2], (channels,)),
            jax.random.normal(keys[3], (batch, width - 1, channels)))


# A sequence shorter than the history (2 < w - 1 = 3), the usual width 4, a wider kernel and
# a width of 1, which has no history.
@pytest.mark.parametrize("batch, length, channels, width", [
    (1, 2, 32, 4),
    (3, 9, 16, 4),
    (2, 7, 48, 6),
    (2, 5, 16, 1),
])
def test_conv_kernel_matches_window_sums(batch, length, channels, width):
    args = conv_inputs(batch, length, channels, width)

    value, gradients = weighted_loss(cpu_kernel.causal_conv_silu)(*args)
    expected_value, expected_gradients = weighted_loss(conv_reference)(*args)

    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, got, expected in zip(["xz", "kernel", "bias", "history"], gradients,
                                   expected_gradients):
        assert got.shape == expected.shape, name
        if expected.size:
            assert float(jnp.abs(expected).max()) > 1e-3, f"gradient of {name} is zero"
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_conv_kernel_rejects_odd_channels():
    with pytest.raises(ValueError, match=r"multiple of 16 channels, got 20"):
        cpu_kernel.causal_conv_silu(*conv_inputs(1, 4, 20, 4))


def test_mamba_gradients_match_sequential():
    # In cpu_kernel mode the mixer runs the conv kernel (conv and SiLU) and the gated kernel
    # (step size, scan, D skip and gate); d_inner = 48 is three blocks of 16 channels.
    tokens = jax.random.randint(jax.random.key(3), (2, 41), 0, 50)

    def loss_and_gradients(scan):
        config = MambaConfig(vocab_size=50, d_model=24, num_layers=2, d_state=8, expand=2,
                             scan=scan)
        graphdef, params, rest = nnx.split(build_language_model(config, rngs=nnx.Rngs(0)),
                                           nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    value, gradients = loss_and_gradients("cpu_kernel")
    expected_value, expected_gradients = loss_and_gradients("sequential")

    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    flat = jax.tree_util.tree_leaves_with_path(gradients)
    expected_flat = jax.tree_util.tree_leaves(expected_gradients)
    assert len(flat) == len(expected_flat) > 10
    for (path, got), expected in zip(flat, expected_flat):
        name = jax.tree_util.keystr(path)
        assert float(jnp.abs(expected).max()) > 0, name
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_kernel_underflowing_decay():
    # dt * A down to -200: exp underflows in float32, so the state starts afresh at such steps.
    args = random_inputs(2, 40, 32, 16, seed=1, dt_max=50.0)

    y, h_last = kernel_scan(*args)
    expected_y, expected_h_last = sequential_scan_reference(*args)

    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_last, expected_h_last, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(weighted_loss(kernel_scan)(*args)[1][1])).all()


# The kernel's gradient is one dot whose first operand is the narrower of x and dy. Both cases,
# with one to three leading axes.
@pytest.mark.parametrize("leading, inputs, outputs", [
    ((2, 5), 8, 24),
    ((2, 5), 24, 8),
    ((7,), 3, 1),
    ((2, 3, 2), 1, 5),
])
def test_project_matches_einsum(leading, inputs, outputs):
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], leading + (inputs,))
    kernel = jax.random.normal(keys[1], (inputs, outputs))
    dy = jax.random.normal(keys[2], leading + (outputs,))

    y, vjp = jax.vjp(cpu_kernel.project, x, kernel)
    expected_y, expected_vjp = jax.vjp(lambda x, k: jnp.einsum("...i,io->...o", x, k), x, kernel)

    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)
    for got, expected in zip(vjp(dy), expected_vjp(dy)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_project_cotangents_keep_dtypes():
    x = jnp.ones((4, 8), jnp.bfloat16)
    kernel = jnp.ones((8, 3), jnp.float32)

    y, vjp = jax.vjp(cpu_kernel.project, x, kernel)
    dx, dkernel = vjp(jnp.ones_like(y))

    assert dx.dtype == jnp.bfloat16
    assert dkernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dkernel), np.full((8, 3), 4.0))


def test_one_step_decay_is_exp():
    # One step from h0 = 1 with x = 0 and C = 1 gives y = exp(dt * A), the kernel's own exp. The
    # exponents go from 0 down to -120, past where float32 underflows (about -87.3).
    dt = jnp.linspace(0.0, 120.0, 4096).reshape(1, 1, 4096)
    A = -jnp.ones((4096, 1))
    ones = jnp.ones((1, 1, 1))

    y, _ = kernel_scan(jnp.zeros_like(dt), dt, A, ones, ones, jnp.ones((1, 4096, 1)))

    exponent = -np.asarray(dt, np.float64).ravel()
    expected = np.exp(exponent)
    got = np.asarray(y, np.float64).ravel()
    normal = expected > np.finfo(np.float32).tiny
    assert normal.sum() > 2900
    assert (~normal).sum() > 1000
    # Rounding the exponent to float32 (A log2(e), then times dt) moves the result by up to about
    # |exponent| 2^-23 relative. The polynomial and the rounding of the result add about 2e-7.
    relative_error = np.abs(got[normal] / expected[normal] - 1)
    assert (relative_error <= 3e-7 + np.abs(exponent[normal]) * 2.0 ** -23).all()
    assert (got[~normal] <= np.finfo(np.float32).tiny).all()
    assert (got[~normal] >= 0).all()


def test_one_step_growth_overflows_to_inf():
    # With A > 0 the same step gives exp(dt * A) > 1, which float32 cannot hold above about 88.72.
    # The portable build overflows from 88.37 (2^127.5) on.
    dt = jnp.linspace(0.0, 100.0, 1024).reshape(1, 1, 1024)
    ones = jnp.ones((1, 1, 1))

    y, _ = kernel_scan(jnp.zeros_like(dt), dt, jnp.ones((1024, 1)), ones, ones,
                       jnp.ones((1, 1024, 1)))

    exponent = np.asarray(dt, np.float64).ravel()
    got = np.asarray(y, np.float64).ravel()
    finite = exponent < 88.3
    assert np.isfinite(got[finite]).all()
    np.testing.assert_allclose(got[finite], np.exp(exponent[finite]),
                               rtol=3e-7 + 88.3 * 2.0 ** -23)
    assert (got[exponent > 88.8] == np.inf).all()


def test_kernel_rejects_state_size_above_64():
    args = random_inputs(1, 4, 16, 65)

    with pytest.raises(ValueError, match=r"state sizes up to 64, got 65.*'sequential'"):
        kernel_scan(*args)


def test_kernels_reject_zero_length():
    with pytest.raises(ValueError, match=r"at least one time step, got shape \(2, 0, 16\)"):
        kernel_scan(*random_inputs(2, 0, 16, 4))
    with pytest.raises(ValueError, match=r"at least one time step, got shape \(2, 0, 16\)"):
        cpu_kernel.gated_selective_scan(*gated_inputs(2, 0, 16, 4))
    with pytest.raises(ValueError, match=r"at least one time step, got shape \(2, 0, 32\)"):
        cpu_kernel.causal_conv_silu(*conv_inputs(2, 0, 16, 4))


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
from ssm import cpu_kernel
from tests.test_cpu_kernel import (conv_inputs, gated_inputs, kernel_scan, random_inputs,
                                   weighted_loss)
assert jax.device_count() == 2
mesh = Mesh(np.array(jax.devices()), ("data",))
# A, dt_bias, D and the conv kernel and bias are shared by all rows; the rest is split.
for scan, args, replicated in ((kernel_scan, random_inputs(4, 37, 48, 16), (2,)),
                               (cpu_kernel.gated_selective_scan, gated_inputs(4, 37, 48, 16),
                                (2, 3, 6)),
                               (cpu_kernel.causal_conv_silu, conv_inputs(4, 37, 48, 4), (1, 2))):
    sharded = tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec() if i in replicated
                                                     else PartitionSpec("data")))
                    for i, a in enumerate(args))
    grad_fn = weighted_loss(scan)
    hlo = grad_fn.lower(*sharded).compile().as_text()
    assert "all-gather" not in hlo, "the batch was gathered onto every device"
    calls = [line for line in hlo.splitlines() if 'custom_call_target="seqmodels_' in line]
    assert len(calls) == 2 and all("f32[2,37," in line for line in calls), calls
    (value, gradients), (expected_value, expected_gradients) = grad_fn(*sharded), grad_fn(*args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, expected in zip(gradients, expected_gradients):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_sharded_batch_runs_per_device():
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                       JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT, str(REPOSITORY)],
                            capture_output=True, text=True, env=environment, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok", result.stdout


FALLBACK_SCRIPT = """
import sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
from ssm import MambaConfig, build_language_model
from ssm.scan import selective_scan
from tests.test_cpu_kernel import random_inputs
args = random_inputs(2, 20, 16, 4)
for _ in range(2):
    y, h_last = selective_scan(*args[:5], h0=args[5], mode="cpu_kernel")
expected_y, expected_h_last = selective_scan(*args[:5], h0=args[5], mode="sequential")
np.testing.assert_array_equal(y, expected_y)
np.testing.assert_array_equal(h_last, expected_h_last)
tokens = jax.numpy.arange(24).reshape(2, 12) % 50
logits = {}
for scan in ("cpu_kernel", "sequential"):
    config = MambaConfig(vocab_size=50, d_model=16, num_layers=1, d_state=4, scan=scan)
    logits[scan] = build_language_model(config, rngs=nnx.Rngs(0))(tokens)
np.testing.assert_array_equal(logits["cpu_kernel"], logits["sequential"])
print("ok")
"""


def test_no_compiler_falls_back_with_warning(tmp_path):
    no_compilers = tmp_path / "bin"
    no_compilers.mkdir()
    environment = {name: value for name, value in os.environ.items() if name != "CXX"}
    environment.update(PATH=str(no_compilers), JAX_PLATFORMS="cpu",
                       **{cpu_kernel.CACHE_ENV: str(tmp_path / "cache")})

    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(REPOSITORY)],
                            capture_output=True, text=True, env=environment, timeout=300,
                            check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok", result.stdout
    warnings = [line for line in result.stderr.splitlines()
                if "runs the sequential scan" in line]
    assert len(warnings) == 1, result.stderr
    assert "needs a C++ compiler" in warnings[0]
    assert "apt install g++" in warnings[0]


def _has_avx512f() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not (_has_avx512f() and shutil.which("g++")),
                    reason="needs g++ and an AVX-512 CPU to build the portable exp path")
def test_portable_build_matches_references(tmp_path):
    # The kernel's exp has a path for AVX-512 and a portable one. Build the portable one on this
    # CPU and run the value and gradient tests against it.
    environment = dict(os.environ, CXX="g++ -mno-avx512f", JAX_PLATFORMS="cpu",
                       **{cpu_kernel.CACHE_ENV: str(tmp_path / "cache")})
    tests = "2-50-40-16 or extreme_inputs or underflowing or one_step"

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
        capture_output=True, text=True, env=environment, timeout=600, check=False,
        cwd=REPOSITORY)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b6 passed", result.stdout), result.stdout[-3000:]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    folder = tmp_path / "kernel cache"
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(folder))
    return folder


def test_missing_cxx_compiler_named(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/no/such/compiler")

    with pytest.raises(cpu_kernel.KernelBuildError,
                       match=r"\$CXX, '/no/such/compiler', was not found.*'sequential'"):
        cpu_kernel.build()


def test_no_compiler_on_path_named(empty_cache, monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(cpu_kernel.KernelBuildError,
                       match=r"needs a C\+\+ compiler.*g\+\+, c\+\+, clang\+\+.*'sequential'"):
        cpu_kernel.build()


def test_failed_build_reports_compiler_output(empty_cache, monkeypatch,
                                                                       tmp_path):
    compiler = tmp_path / "failing-compiler"
    compiler.write_text("#!/bin/sh\necho 'selective_scan_cpu.cc:1: error: no vectors here' >&2\n"
                        "exit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))

    with pytest.raises(cpu_kernel.KernelBuildError, match=r"(?s)failed to build.*no vectors here"):
        cpu_kernel.build()
    assert list(empty_cache.iterdir()) == []


def test_unwritable_cache_folder_named(monkeypatch):
    # /proc/self exists and takes no new files, even for root.
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, "/proc/self")

    with pytest.raises(cpu_kernel.KernelBuildError,
                       match=r"cannot write the kernel to the cache folder /proc/self.*"
                             r"SEQMODELS_KERNEL_CACHE to a writable folder"):
        cpu_kernel.build()


def test_compiler_that_hangs_times_out(empty_cache, monkeypatch, tmp_path):
    compiler = tmp_path / "hanging-compiler"
    compiler.write_text("#!/bin/sh\nsleep 60\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setattr(cpu_kernel, "COMPILE_TIMEOUT", 1)

    with pytest.raises(cpu_kernel.KernelBuildError, match=r"timed out after 1 s"):
        cpu_kernel.build()


def test_cxx_with_launcher_and_flags(monkeypatch):
    monkeypatch.setenv("CXX", "env g++ -O2")

    assert cpu_kernel.find_compiler() == [shutil.which("env"), "g++", "-O2"]


def test_missing_source_named(empty_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "SOURCE", tmp_path / "selective_scan_cpu.cc")

    with pytest.raises(cpu_kernel.KernelBuildError, match=r"source .* is missing; reinstall"):
        cpu_kernel.build()


def test_build_is_cached_and_reused(empty_cache):
    library = cpu_kernel.build()
    built_at = library.stat().st_mtime_ns

    assert library.parent == empty_cache
    assert cpu_kernel.build() == library
    assert library.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in empty_cache.iterdir()) == sorted(
        [library.name, library.with_suffix(".sha256").name])


def test_truncated_library_is_rebuilt(empty_cache, monkeypatch, tmp_path):
    # dlopen of a truncated library can kill the process with a bus error, so build() must
    # not return it: with a compiler that fails, the rebuild it starts reports that failure.
    library = cpu_kernel.build()
    library.write_bytes(library.read_bytes()[:100_000])
    compiler = tmp_path / "failing-compiler"
    compiler.write_text("#!/bin/sh\necho 'compiler was called' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))

    with pytest.raises(cpu_kernel.KernelBuildError, match=r"compiler was called"):
        cpu_kernel.build()
