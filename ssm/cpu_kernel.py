"""The `cpu_kernel` selective scan: a C++ kernel for the CPU, built on first use.

On a CPU, XLA runs the `sequential` scan as a `while` loop whose every step launches several
small kernels and copies slices in and out. `selective_scan_cpu.cc` runs the same recurrence as
two XLA FFI handlers (forward and backward) that keep each block of 16 channels' state in
registers for the whole sequence. It computes what the `sequential` mode computes, in float32,
and its residuals are of the same kind: the state every 16 steps (32 in `sequential`).

The first use on a machine compiles the source with the machine's C++ compiler (`$CXX`, else
`g++`, `c++` or `clang++` on the PATH) and `-march=native`, and caches the library under
`$SEQMODELS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/seqmodels`, else `~/.cache/seqmodels`. The
cache key covers the source, the compiler and its version, the flags, the JAX version and the
CPU's instruction set extensions, so a home folder shared by different machines keeps one
build per kind of machine. Where the kernel cannot be built (no compiler, or it fails),
`available()` logs one warning with the reason and returns False. The `cpu_kernel` scan mode
then runs the `sequential` scan instead. `build()` and `load()` raise `KernelBuildError`.

Besides the scan, the library has the two other parts of the Mamba mixer that are slow in XLA on
a CPU, for `ssm.mamba.MambaMixer` in `cpu_kernel` mode: `gated_selective_scan` (the softplus of
the step size, the scan, the D skip and the SiLU gate) and `causal_conv_silu` (the causal
convolution and SiLU, which writes the gradient of in_proj's output whole). `project` is the
mixer's matrix product, with a kernel gradient that is one dot over the leading axes.

Under `jax.jit` with the batch sharded over devices, both handlers run on each device's part of
the batch (`custom_partitioning`); the gradient of A is summed over the batch afterwards, which
the partitioner turns into an all-reduce.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

SOURCE = Path(__file__).with_name("selective_scan_cpu.cc")
# Must match kLanes, kInterval and `WithStateSize` in the source.
LANES = 16
KEPT_STATE_INTERVAL = 16
STATE_SIZES = (1, 2, 4, 8, 16, 32, 64)
# XLA custom-call target name -> symbol of the handler in the library.
TARGETS = {
    "seqmodels_selective_scan_forward": "SelectiveScanForward",
    "seqmodels_selective_scan_backward": "SelectiveScanBackward",
    "seqmodels_gated_selective_scan_forward": "GatedSelectiveScanForward",
    "seqmodels_gated_selective_scan_backward": "GatedSelectiveScanBackward",
    "seqmodels_causal_conv_silu_forward": "CausalConvSiluForward",
    "seqmodels_causal_conv_silu_backward": "CausalConvSiluBackward",
}
CACHE_ENV = "SEQMODELS_KERNEL_CACHE"
SEQUENTIAL_HINT = "scan mode 'sequential' (--config.model.scan=sequential in train.py)"
COMPILERS = ("g++", "c++", "clang++")
# Seconds that one compilation may take before the build gives up.
COMPILE_TIMEOUT = 600
# -march=native lets the compiler use every vector extension of this CPU; the second set is for
# compilers that do not accept it.
FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=fast"),
    ("-O3", "-ffp-contract=fast"),
)


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def cache_folder() -> Path:
    """Return the folder that contains built kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqmodels"


def find_compiler() -> list[str]:
    """Return the command of the C++ compiler: `$CXX`, else the first of `COMPILERS` found.

    `$CXX` may carry a launcher or flags, as in Make (`ccache g++`, `g++ -O2`); its first word
    must be on the PATH or a path.
    """
    if os.environ.get("CXX"):
        words = shlex.split(os.environ["CXX"])
        program = shutil.which(words[0]) if words else None
        if program is None:
            raise KernelBuildError(
                f"the C++ compiler named by $CXX, {os.environ['CXX']!r}, was not found; "
                f"set CXX to an installed compiler, or use {SEQUENTIAL_HINT}.")
        return [program, *words[1:]]
    for name in COMPILERS:
        compiler = shutil.which(name)
        if compiler is not None:
            return [compiler]
    raise KernelBuildError(
        f"scan mode 'cpu_kernel' needs a C++ compiler to build its kernel and found none of "
        f"{', '.join(COMPILERS)} on the PATH; install one (Debian/Ubuntu: apt install g++), set "
        f"CXX, or use {SEQUENTIAL_HINT}.")


def _cpu_features() -> str:
    """Return the CPU's flags line from /proc/cpuinfo where there is one, else the machine name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _run_compiler(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        raise KernelBuildError(f"{shlex.join(command[:1])} timed out after {COMPILE_TIMEOUT} s; "
                               f"use {SEQUENTIAL_HINT}.") from error
    except OSError as error:
        raise KernelBuildError(f"cannot run the C++ compiler {command[0]}: {error}; use "
                               f"{SEQUENTIAL_HINT}.") from error


def _compile(compiler: list[str], flags: tuple[str, ...], output: Path):
    command = [*compiler, *flags, "-std=c++17", "-fPIC", "-shared", "-w",
               "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(output)]
    return _run_compiler(command)


def _digest_path(library: Path) -> Path:
    return library.with_suffix(".sha256")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_intact(library: Path) -> bool:
    """Return whether `library` has the SHA-256 recorded when it was built.

    A truncated shared library can crash the process with a bus error inside `dlopen`, which
    Python cannot catch, so a cached build is checked before it is loaded.
    """
    try:
        return _digest_path(library).read_text().strip() == _file_digest(library)
    except OSError:
        return False


def build() -> Path:
    """Compile the kernel unless the cache has it; return the path of the shared library."""
    if not SOURCE.is_file():
        raise KernelBuildError(f"the kernel's source {SOURCE} is missing; reinstall the package.")

    compiler = find_compiler()
    version = _run_compiler([*compiler, "--version"]).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), shlex.join(compiler).encode(), version.encode(),
                 repr(FLAG_SETS).encode(), jax.__version__.encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    folder = cache_folder()
    library = folder / f"selective_scan_cpu-{key.hexdigest()[:16]}.so"
    if _is_intact(library):
        return library

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KernelBuildError(f"cannot create the kernel cache folder {folder}: {error}; set "
                               f"{CACHE_ENV} to a writable folder.") from error

    # Build under a temporary name and rename, so that processes building at once never load
    # a half-written library.
    logging.info("compiling the cpu_kernel scan with %s into %s (once per machine, about 15 s)",
                 shlex.join(compiler), library)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            partial = Path(scratch) / library.name
            for flags in FLAG_SETS:
                result = _compile(compiler, flags, partial)
                if result.returncode == 0:
                    # The digest goes first: a library without a matching one is rebuilt.
                    _digest_path(library).write_text(_file_digest(partial) + "\n")
                    os.replace(partial, library)
                    return library
    except OSError as error:
        raise KernelBuildError(f"cannot write the kernel to the cache folder {folder}: {error}; "
                               f"set {CACHE_ENV} to a writable folder.") from error

    details = result.stderr.strip().splitlines()[-5:]
    raise KernelBuildError(
        f"{shlex.join(compiler)} failed to build {SOURCE.name}:\n" + "\n".join(details)
        + f"\nUse {SEQUENTIAL_HINT} instead.")


@functools.cache
def load() -> None:
    """Build the kernel if needed and register its handlers with XLA, once per process."""
    library_path = build()
    try:
        library = ctypes.CDLL(str(library_path))
        handlers = {target: getattr(library, symbol) for target, symbol in TARGETS.items()}
    except (OSError, AttributeError) as error:
        raise KernelBuildError(f"cannot load {library_path}: {error}; delete it to rebuild.") \
            from error
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def available() -> bool:
    """Return whether the kernel is loaded; if it cannot be, log why once and return False."""
    try:
        load()
    except KernelBuildError as error:
        logging.warning("scan mode 'cpu_kernel' runs the sequential scan because its C++ kernel "
                        "is not available: %s", error)
        return False
    return True


def _call(target, result_shapes, *operands):
    results = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in result_shapes)
    return jax.ffi.ffi_call(target, results)(*operands)


def _kept_shape(x, A):
    batch, length, channels = x.shape
    return (batch, -(-length // KEPT_STATE_INTERVAL), A.shape[1], channels)


def _forward_call(x, dt, A, B, C, h0):
    return _call("seqmodels_selective_scan_forward", (x.shape, h0.shape, _kept_shape(x, A)),
                 x, dt, A, B, C, h0)


def _backward_call(x, dt, A, B, C, kept, dy, dh_last):
    # The gradient of A comes per batch row, (b, e, n), so that each device returns its own part.
    return _call("seqmodels_selective_scan_backward",
                 (x.shape, x.shape, dh_last.shape, B.shape, B.shape, dh_last.shape),
                 x, dt, A, B, C, kept, dy, dh_last)


def _gated_forward_call(x, dt_raw, dt_bias, A, B, C, D, z, h0):
    return _call("seqmodels_gated_selective_scan_forward", (x.shape, h0.shape, _kept_shape(x, A)),
                 x, dt_raw, dt_bias, A, B, C, D, z, h0)


def _gated_backward_call(x, dt_raw, dt_bias, A, B, C, D, z, kept, d_out, dh_last):
    # The gradients of A, D and dt_bias come per batch row, as that of A above.
    rows = x.shape[:1] + D.shape
    return _call("seqmodels_gated_selective_scan_backward",
                 (x.shape, x.shape, dh_last.shape, B.shape, B.shape, dh_last.shape, rows, x.shape,
                  rows),
                 x, dt_raw, dt_bias, A, B, C, D, z, kept, d_out, dh_last)


def _conv_forward_call(xz, kernel, bias, history):
    shape = xz.shape[:2] + kernel.shape[1:]
    return _call("seqmodels_causal_conv_silu_forward", (shape, shape), xz, kernel, bias, history)


def _conv_backward_call(xz, kernel, bias, history, dx, dz):
    # The gradients of the kernel and bias come per batch row, as that of A above.
    return _call("seqmodels_causal_conv_silu_backward",
                 (xz.shape, xz.shape[:1] + kernel.shape, xz.shape[:1] + bias.shape,
                  history.shape),
                 xz, kernel, bias, history, dx, dz)


def _split_over_batch(function, sharding_rule: str, replicated: tuple[int, ...]):
    """Wrap `function` so that a batch-sharded call runs on each device's rows.

    Every operand and result has the batch first, except the arguments at the indices
    `replicated` (A, D, dt_bias), which every device gets whole. Other dimensions are gathered if
    they arrive sharded.
    """
    wrapped = custom_partitioning(function)

    def sharding(mesh, rank, batch_axes):
        return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (rank - 1))))

    def batch_axes_of(arg_shapes):
        spec = arg_shapes[0].sharding.spec
        return spec[0] if len(spec) else None

    def result_shardings(mesh, arg_shapes, result_shape):
        batch_axes = batch_axes_of(arg_shapes)
        return tuple(sharding(mesh, len(result.shape), batch_axes) for result in result_shape)

    def partition(mesh, arg_shapes, result_shape):
        batch_axes = batch_axes_of(arg_shapes)
        arg_shardings = tuple(
            NamedSharding(mesh, PartitionSpec()) if index in replicated
            else sharding(mesh, len(arg.shape), batch_axes)
            for index, arg in enumerate(arg_shapes))
        return mesh, function, result_shardings(mesh, arg_shapes, result_shape), arg_shardings

    # Every factor but the batch, in the order of first appearance, which Shardy requires.
    factors = dict.fromkeys(sharding_rule.replace(",", " ").replace("->", " ").split())
    wrapped.def_partition(partition, infer_sharding_from_operands=result_shardings,
                          sharding_rule=sharding_rule,
                          need_replication_factors=tuple(factor for factor in factors
                                                         if factor != "b"))
    return wrapped


_forward = _split_over_batch(
    _forward_call, "b t e, b t e, e n, b t n, b t n, b e n -> b t e, b e n, b k n e",
    replicated=(2,))
_backward = _split_over_batch(
    _backward_call, "b t e, b t e, e n, b t n, b t n, b k n e, b t e, b e n -> "
                    "b t e, b t e, b e n, b t n, b t n, b e n", replicated=(2,))
_gated_forward = _split_over_batch(
    _gated_forward_call,
    "b t e, b t e, e, e n, b t n, b t n, e, b t e, b e n -> b t e, b e n, b k n e",
    replicated=(2, 3, 6))
_gated_backward = _split_over_batch(
    _gated_backward_call,
    "b t e, b t e, e, e n, b t n, b t n, e, b t e, b k n e, b t e, b e n -> "
    "b t e, b t e, b e n, b t n, b t n, b e n, b e, b t e, b e", replicated=(2, 3, 6))

_conv_forward = _split_over_batch(
    _conv_forward_call, "b t f, w e, e, b h e -> b t e, b t e", replicated=(1, 2))
_conv_backward = _split_over_batch(
    _conv_backward_call, "b t f, w e, e, b h e, b t e, b t e -> b t f, b w e, b e, b h e",
    replicated=(1, 2))


@jax.custom_vjp
def _scan(x, dt, A, B, C, h0):
    y, h_last, _ = _forward(x, dt, A, B, C, h0)
    return y, h_last


def _scan_forward(x, dt, A, B, C, h0):
    y, h_last, kept = _forward(x, dt, A, B, C, h0)
    return (y, h_last), (x, dt, A, B, C, kept)


def _scan_backward(residuals, cotangents):
    dx, d_dt, dA_ben, dB, dC, dh0 = _backward(*residuals, *cotangents)
    return dx, d_dt, dA_ben.sum(0), dB, dC, dh0


_scan.defvjp(_scan_forward, _scan_backward)


@jax.custom_vjp
def _gated_scan(x, dt_raw, dt_bias, A, B, C, D, z, h0):
    out, h_last, _ = _gated_forward(x, dt_raw, dt_bias, A, B, C, D, z, h0)
    return out, h_last


def _gated_scan_forward(x, dt_raw, dt_bias, A, B, C, D, z, h0):
    out, h_last, kept = _gated_forward(x, dt_raw, dt_bias, A, B, C, D, z, h0)
    return (out, h_last), (x, dt_raw, dt_bias, A, B, C, D, z, kept)


def _gated_scan_backward(residuals, cotangents):
    dx, d_dt_raw, dA_ben, dB, dC, dh0, dD_be, dz, d_dt_bias_be = _gated_backward(
        *residuals, *cotangents)
    return (dx, d_dt_raw, d_dt_bias_be.sum(0), dA_ben.sum(0), dB, dC, dD_be.sum(0), dz, dh0)


_gated_scan.defvjp(_gated_scan_forward, _gated_scan_backward)


@jax.custom_vjp
def _conv(xz, kernel, bias, history):
    return _conv_forward(xz, kernel, bias, history)


def _conv_vjp_forward(xz, kernel, bias, history):
    return _conv_forward(xz, kernel, bias, history), (xz, kernel, bias, history)


def _conv_vjp_backward(residuals, cotangents):
    dxz, dkernel_bwe, dbias_be, dhistory = _conv_backward(*residuals, *cotangents)
    return dxz, dkernel_bwe.sum(0), dbias_be.sum(0), dhistory


_conv.defvjp(_conv_vjp_forward, _conv_vjp_backward)


def causal_conv_silu(xz, kernel, bias, history):
    """Return x = silu(causal depthwise conv of xz[..., :e] + bias) and z = xz[..., e:].

    This is the part of the Mamba mixer between in_proj and x_proj (`ssm.mamba.CausalConv1d`
    followed by SiLU), in float32. xz is (b, t, 2e), kernel (w, e) with kernel[w - 1] on the
    current input, bias (e,), history (b, w - 1, e) the inputs before xz. e must be a multiple
    of 16. Both results are (b, t, e); the backward pass writes the cotangent of xz whole.
    """
    load()
    _require_time_steps(xz)
    if kernel.shape[1] % LANES:
        raise ValueError(f"causal_conv_silu needs a multiple of {LANES} channels, got "
                         f"{kernel.shape[1]}")
    return _conv(xz, kernel, bias, history)


def _require_time_steps(x):
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"x must be (b, t, e) with at least one time step, got shape {x.shape}")


def _padded_state_size(state_size: int) -> int:
    for size in STATE_SIZES:
        if size >= state_size:
            return size
    raise ValueError(f"scan mode 'cpu_kernel' supports state sizes up to {STATE_SIZES[-1]}, got "
                     f"{state_size}; use scan mode 'sequential'.")


def _pad(array, widths, value=0.0):
    """Pad the trailing axes of `array` at their ends by `widths`."""
    if not any(widths):
        return array
    leading = [(0, 0)] * (array.ndim - len(widths))
    return jnp.pad(array, leading + [(0, width) for width in widths], constant_values=value)


def _paddings(A):
    """Return the channel and state padding that the kernel needs for A (e, n)."""
    channels, state_size = A.shape
    return -channels % LANES, _padded_state_size(state_size) - state_size


def selective_scan(x, dt, A, B, C, h0):
    """Run the recurrence of `ssm.scan` with the C++ kernel; return y and the final state.

    All inputs are float32 with the shapes of `ssm.scan.selective_scan`, h0 included. Channels
    are padded to a multiple of 16 and the state size to the next of `STATE_SIZES`; padded
    channels have x = 0 and padded states B = C = 0, so neither changes the result.
    """
    load()
    _require_time_steps(x)
    channels, state_size = A.shape
    channel_padding, state_padding = _paddings(A)
    y, h_last = _scan(
        _pad(x, [channel_padding]), _pad(dt, [channel_padding]),
        _pad(A, [channel_padding, state_padding], value=-1.0), _pad(B, [state_padding]),
        _pad(C, [state_padding]), _pad(h0, [channel_padding, state_padding]))
    return y[..., :channels], h_last[:, :channels, :state_size]


def gated_selective_scan(x, dt_raw, dt_bias, A, B, C, D, z, h0):
    """Run the Mamba mixer's scan with its step size and output gate in one kernel.

    Returns ((y + D x) * silu(z), h_last), where y and h_last are those of
    `selective_scan(x, softplus(dt_raw + dt_bias), A, B, C, h0)`. dt_bias and D are (e,), z is
    (b, t, e) like x, and all inputs are float32. The softplus and SiLU inside the kernel use
    their own float32 exp and log1p, which agree with JAX's to about 1e-7 relative.
    """
    load()
    _require_time_steps(x)
    channels, state_size = A.shape
    channel_padding, state_padding = _paddings(A)
    by_channel = [channel_padding]
    out, h_last = _gated_scan(
        _pad(x, by_channel), _pad(dt_raw, by_channel), _pad(dt_bias, by_channel),
        _pad(A, [channel_padding, state_padding], value=-1.0), _pad(B, [state_padding]),
        _pad(C, [state_padding]), _pad(D, by_channel), _pad(z, by_channel),
        _pad(h0, [channel_padding, state_padding]))
    return out[..., :channels], h_last[:, :channels, :state_size]


@jax.custom_vjp
def project(x, kernel):
    """Return x (..., i) @ kernel (i, o), whose kernel gradient is one dot over the leading axes.

    JAX's rule for the gradient of kernel is a dot of the cotangent with x followed by a
    transpose. With the batch split over devices by `jax.jit`, the sum over devices comes between
    the two (not under `training.steps.data_parallel_loss_and_grads`, which sums afterwards).
    NOTE: in the HLO of XLA's CPU backend (jax 0.10.2) the transpose then stayed apart from the
    dot, so the output cotangent was first copied into a transposed layout. With this rule the
    dot copies the narrower of x and the cotangent. No test checks the HLO. The training step of
    the peers benchmark took about 4% less time with this rule (benchmarks/README.md).
    """
    return jnp.einsum("...i,io->...o", x, kernel)


def _project_forward(x, kernel):
    return project(x, kernel), (x, kernel)


def _project_backward(residuals, dy):
    x, kernel = residuals
    leading = tuple(range(x.ndim - 1))
    contract_leading = ((leading, leading), ((), ()))
    # XLA's CPU backend copies the dot's first operand into a transposed layout, so the narrower
    # of x and dy goes first.
    if x.shape[-1] <= dy.shape[-1]:
        dkernel = jax.lax.dot_general(x, dy, contract_leading)
    else:
        # Without the barrier XLA folds the transpose into the dot (jax 0.10.2). That dot then
        # runs outside YNNPACK after a copy of x, and the step of `benchmarks/peers.py` took 2 to
        # 4% longer.
        dkernel = jax.lax.optimization_barrier(jax.lax.dot_general(dy, x, contract_leading)).T
    dx = jnp.einsum("...o,io->...i", dy, kernel)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_forward, _project_backward)
