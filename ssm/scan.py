"""Selective scan: the linear recurrence at the core of Mamba, in three interchangeable forms.

For every batch row, channel e and state index n:

  h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (state, (b, e, n))
  y_t = sum_n C_t[n] * h_t[:, n]                           (output, (b, e))

Shapes use the legend of `models`: x and dt are (b, t, e), A is (e, n), B and C are (b, t, n),
the initial state h0 and the final state are (b, e, n).

- `sequential`: `jax.lax.scan` over time, one step at a time, with a hand-written backward pass
  (`jax.custom_vjp`). The lightest on memory, but its length-t chain of dependent steps runs
  serially. The forward keeps the state only every `SEQUENTIAL_CHECKPOINT_INTERVAL` steps. The
  backward recomputes the states and decays exp(dt * A) of one interval at a time, then runs
  one reverse `lax.scan` whose body emits all the gradients of a step.
  `sequential_scan_reference` is the same forward differentiated by JAX, which stores
  (t, b, e, n) residuals; tests hold the two equal. Being a `jax.custom_vjp`, this mode has no
  forward-mode derivative: `jax.jvp` and `jax.jacfwd` raise JAX's TypeError, while `jax.grad`,
  `jax.hessian` (forward over reverse) and `jax.vmap` work. The other modes support both.
- `associative`: `jax.lax.associative_scan` with `combine_linear_recurrence`, O(log t) depth but
  it materialises the (b, t, e, n) decays and inputs of the whole sequence.
- `chunked`: `jax.lax.scan` over chunks of `chunk_size` steps with an associative scan inside
  each chunk. Each chunk is rematerialised in the backward pass (`jax.checkpoint`), so the
  (b, chunk, e, n) tensors of only one chunk are live at a time.
- `cpu_kernel`: the `sequential` algorithm as a C++ kernel for the CPU (`ssm.cpu_kernel`),
  compiled with the machine's C++ compiler on first use. Float32 only, state size at most 64.
  On other backends (GPU, TPU), and where the kernel cannot be built (a warning says why), it
  runs `sequential`. Like `sequential`, a `jax.custom_vjp`. Unlike it, `jax.vmap` and second
  derivatives (`jax.hessian`, grad of grad) raise NotImplementedError: its kernels sit inside
  `custom_partitioning`, which has no batching or differentiation rule (JAX 0.10).

All accumulate in float32 (float64 for float64 inputs) and return y in the dtype of x.
"""

import jax
import jax.numpy as jnp

from ssm import cpu_kernel

SCAN_MODES = ("associative", "sequential", "chunked", "cpu_kernel")
DEFAULT_CHUNK_SIZE = 256
# Steps between the states that `sequential` keeps for its backward pass, so its residual
# states are 1/32 of (t, b, e, n). Intervals of 16, 64 and 128 steps were not faster in one
# measurement on a 2-core x86 CPU (b=4, t=512, e=512, n=16).
SEQUENTIAL_CHECKPOINT_INTERVAL = 32


def _kernel_runs() -> bool:
    """Return whether the cpu_kernel mode runs its kernel here: on a CPU where it was built."""
    return jax.default_backend() == "cpu" and cpu_kernel.available()


def validate_scan_mode(mode: str) -> None:
    """Raise ValueError unless `mode` names one of `SCAN_MODES`."""
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}, got {mode!r}")


def validate_chunk_size(chunk_size: int) -> None:
    """Raise ValueError unless `chunk_size` is an integer >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def combine_linear_recurrence(earlier, later):
    """Compose two segments of the recurrence h -> a * h + b (the associative scan operator).

    Each argument is a pair (a, b). Applying `earlier` then `later` gives
    h -> a_later * (a_earlier * h + b_earlier) + b_later, that is the pair
    (a_later * a_earlier, a_later * b_earlier + b_later).
    """
    decay_earlier, input_earlier = earlier
    decay_later, input_later = later
    return decay_later * decay_earlier, decay_later * input_earlier + input_later


def _accumulation_dtype(dtype) -> jnp.dtype:
    # float32 at least: a bfloat16 carry loses the state within a few dozen steps.
    return jnp.promote_types(dtype, jnp.float32)


def _discretize(x, dt, A, B):
    """Return the per-step decays exp(dt * A) and inputs dt * B * x, both (b, t, e, n)."""
    decay_bten = jnp.exp(dt[..., None] * A)
    input_bten = (dt * x)[..., None] * B[:, :, None, :]
    return decay_bten, input_bten


def _associative_scan(x, dt, A, B, C, h0):
    decay_bten, input_bten = _discretize(x, dt, A, B)

    # Fold the initial state into the first input, so the scan itself starts from zero.
    first_input = decay_bten[:, 0] * h0 + input_bten[:, 0]
    input_bten = input_bten.at[:, 0].set(first_input)

    _, h_bten = jax.lax.associative_scan(
        combine_linear_recurrence, (decay_bten, input_bten), axis=1)
    y_bte = jnp.einsum("bten,btn->bte", h_bten, C)
    return y_bte, h_bten[:, -1]


def sequential_scan_reference(x, dt, A, B, C, h0):
    """Return y and the final state of the recurrence, for JAX's autodiff to differentiate.

    This is the slow twin of the `sequential` mode, for tests. The inputs must already be in the
    accumulation dtype, and h0 is required. JAX's backward pass stores (t, b, e, n) residuals.
    """
    def step(h_ben, inputs):
        x_be, dt_be, B_bn, C_bn = inputs
        decay_ben = jnp.exp(dt_be[..., None] * A)
        h_ben = decay_ben * h_ben + (dt_be * x_be)[..., None] * B_bn[:, None, :]
        y_be = jnp.einsum("ben,bn->be", h_ben, C_bn)
        return h_ben, y_be

    time_major = tuple(jnp.swapaxes(array, 0, 1) for array in (x, dt, B, C))
    h_last, y_tbe = jax.lax.scan(step, h0, time_major)
    return jnp.swapaxes(y_tbe, 0, 1), h_last


def _time_major_intervals(arrays, interval):
    """Pad (b, t, ...) arrays with zeros to whole intervals and return them as (k, interval, b, ...).

    Padded steps have dt = 0, so their decay is 1 and their input 0: the state passes through
    them unchanged, and the cotangent does too in the backward pass.
    """
    length = arrays[0].shape[1]
    num_intervals = -(-length // interval)
    padding = num_intervals * interval - length

    def pad_and_split(array):
        array = jnp.pad(array, [(0, 0), (0, padding), (0, 0)])
        array = jnp.swapaxes(array, 0, 1)
        return array.reshape((num_intervals, interval) + array.shape[1:])

    return tuple(pad_and_split(array) for array in arrays)


def _batch_major(array_kibx, length):
    """Invert `_time_major_intervals` for one array: (k, interval, b, ...) -> (b, t, ...)."""
    array_tbx = array_kibx.reshape((-1,) + array_kibx.shape[2:])[:length]
    return jnp.swapaxes(array_tbx, 0, 1)


# The `sequential` mode keeps its state as (b, n, e), so that sums over n and b add contiguous
# e-vectors. On XLA:CPU a (b, e, n) state compiled to per-step transposes and ran 2x slower.


def _sum_over_n(array_bne):
    """Sum (b, n, e) over n as a chain of adds of (b, e) slices.

    `jnp.sum` and einsum compiled to slower per-step reductions on XLA:CPU.
    """
    total_be = array_bne[:, 0]
    for index in range(1, array_bne.shape[1]):
        total_be = total_be + array_bne[:, index]
    return total_be


def _interval_outputs(x_ibe, dt_ibe, A_ne, B_ibn, C_ibn, h_bne):
    """Run one interval forward and return its last state and the outputs y (interval, b, e)."""
    def step(h_bne, inputs):
        x_be, dt_be, B_bn, C_bn = inputs
        decay_bne = jnp.exp(dt_be[:, None, :] * A_ne)
        h_bne = decay_bne * h_bne + (dt_be * x_be)[:, None, :] * B_bn[:, :, None]
        return h_bne, jnp.einsum("bne,bn->be", h_bne, C_bn)

    return jax.lax.scan(step, h_bne, (x_ibe, dt_ibe, B_ibn, C_ibn))


def _interval_previous_states(x_ibe, dt_ibe, A_ne, B_ibn, h_bne):
    """Recompute one interval forward and return the state before each step and its decay.

    Both are (interval, b, n, e). Keeping the decays saves the backward pass one exp per element.
    """
    def step(h_bne, inputs):
        x_be, dt_be, B_bn = inputs
        decay_bne = jnp.exp(dt_be[:, None, :] * A_ne)
        h_next_bne = decay_bne * h_bne + (dt_be * x_be)[:, None, :] * B_bn[:, :, None]
        return h_next_bne, (h_bne, decay_bne)

    _, (h_previous_ibne, decay_ibne) = jax.lax.scan(step, h_bne, (x_ibe, dt_ibe, B_ibn))
    return h_previous_ibne, decay_ibne


def _interval_backward(x_ibe, dt_ibe, A_ne, B_ibn, C_ibn, h_previous_ibne, decay_ibne, dy_ibe,
                       dh_bne, dA_bne):
    """Run the backward pass of one interval in reverse time.

    `dh_bne` is the cotangent of the interval's last state from everything after it, and
    `dA_bne` the gradient of A (transposed) accumulated so far, not yet summed over the batch.
    Returns the cotangent of the state before the interval, the updated `dA_bne` and the per-step
    gradients of x, dt, B and C.
    """
    def step(carry, inputs):
        dh_later_bne, dA_bne = carry
        x_be, dt_be, B_bn, C_bn, h_previous_bne, decay_bne, dy_be = inputs

        # The state after this step, recomputed: h_t = decay * h_{t-1} + dt * x * B.
        dt_x_be = dt_be * x_be
        h_bne = decay_bne * h_previous_bne + dt_x_be[:, None, :] * B_bn[:, :, None]

        # Cotangent of h_t: from y_t = sum_n C_t h_t, and from h_{t+1} through its decay.
        dh_bne = dh_later_bne + dy_be[:, None, :] * C_bn[:, :, None]

        dC_bn = jnp.einsum("bne,be->bn", h_bne, dy_be)
        dB_bn = jnp.einsum("bne,be->bn", dh_bne, dt_x_be)
        d_dt_x_be = jnp.einsum("bne,bn->be", dh_bne, B_bn)
        # Cotangent of dt * A, through decay = exp(dt * A).
        d_dt_A_bne = dh_bne * h_previous_bne * decay_bne
        d_dt_be = d_dt_x_be * x_be + _sum_over_n(d_dt_A_bne * A_ne)
        dA_bne = dA_bne + d_dt_A_bne * dt_be[:, None, :]

        return (decay_bne * dh_bne, dA_bne), (d_dt_x_be * dt_be, d_dt_be, dB_bn, dC_bn)

    inputs = (x_ibe, dt_ibe, B_ibn, C_ibn, h_previous_ibne, decay_ibne, dy_ibe)
    return jax.lax.scan(step, (dh_bne, dA_bne), inputs, reverse=True)


def _checkpoint_interval(length):
    return min(SEQUENTIAL_CHECKPOINT_INTERVAL, length)


def _sequential_scan_forward(x, dt, A, B, C, h0):
    """Return (y, h_last) and the residuals: the inputs and the state at each interval start."""
    length = x.shape[1]
    intervals = _time_major_intervals((x, dt, B, C), _checkpoint_interval(length))
    A_ne = A.T

    def interval(h_bne, inputs):
        x_ibe, dt_ibe, B_ibn, C_ibn = inputs
        h_last_bne, y_ibe = _interval_outputs(x_ibe, dt_ibe, A_ne, B_ibn, C_ibn, h_bne)
        return h_last_bne, (y_ibe, h_bne)

    h_last_bne, (y_kibe, h_start_kbne) = jax.lax.scan(
        interval, jnp.swapaxes(h0, 1, 2), intervals)
    outputs = (_batch_major(y_kibe, length), jnp.swapaxes(h_last_bne, 1, 2))
    return outputs, (x, dt, A_ne, B, C, h_start_kbne)


def _sequential_scan_backward(residuals, cotangents):
    x, dt, A_ne, B, C, h_start_kbne = residuals
    dy, dh_last = cotangents
    length = x.shape[1]
    intervals = _time_major_intervals((x, dt, B, C, dy), _checkpoint_interval(length))

    def interval(carry, inputs):
        dh_bne, dA_bne = carry
        x_ibe, dt_ibe, B_ibn, C_ibn, dy_ibe, h_start_bne = inputs
        h_previous_ibne, decay_ibne = _interval_previous_states(
            x_ibe, dt_ibe, A_ne, B_ibn, h_start_bne)
        return _interval_backward(x_ibe, dt_ibe, A_ne, B_ibn, C_ibn, h_previous_ibne,
                                  decay_ibne, dy_ibe, dh_bne, dA_bne)

    initial = (jnp.swapaxes(dh_last, 1, 2), jnp.zeros_like(h_start_kbne[0]))
    (dh0_bne, dA_bne), step_gradients = jax.lax.scan(
        interval, initial, intervals + (h_start_kbne,), reverse=True)
    dx, d_dt, dB, dC = (_batch_major(gradient, length) for gradient in step_gradients)
    return dx, d_dt, dA_bne.sum(0).T, dB, dC, jnp.swapaxes(dh0_bne, 1, 2)


@jax.custom_vjp
def _sequential_scan(x, dt, A, B, C, h0):
    """Run the recurrence of `sequential_scan_reference` with a hand-written backward pass."""
    # Without differentiation the interval states of the residuals are unused, and jit drops them.
    outputs, _ = _sequential_scan_forward(x, dt, A, B, C, h0)
    return outputs


_sequential_scan.defvjp(_sequential_scan_forward, _sequential_scan_backward)


def _chunked_scan(x, dt, A, B, C, h0, chunk_size):
    batch, length, expanded = x.shape
    # A chunk longer than the sequence would only add padded steps.
    chunk_size = min(chunk_size, length)
    num_chunks = -(-length // chunk_size)
    padding = num_chunks * chunk_size - length

    # Padded steps have dt = 0, so their decay is 1 and their input 0: the state passes through.
    def pad_and_split(array):
        array = jnp.pad(array, [(0, 0), (0, padding), (0, 0)])
        array = array.reshape(batch, num_chunks, chunk_size, array.shape[-1])
        return jnp.swapaxes(array, 0, 1)  # (chunks, b, chunk, ...)

    @jax.checkpoint
    def scan_chunk(h_ben, chunk):
        x_c, dt_c, B_c, C_c = chunk
        y_c, h_ben = _associative_scan(x_c, dt_c, A, B_c, C_c, h_ben)
        return h_ben, y_c

    chunks = tuple(pad_and_split(array) for array in (x, dt, B, C))
    h_last, y_chunks = jax.lax.scan(scan_chunk, h0, chunks)
    y_bte = jnp.swapaxes(y_chunks, 0, 1).reshape(batch, num_chunks * chunk_size, expanded)
    return y_bte[:, :length], h_last


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    h0: jax.Array | None = None,
    mode: str = "associative",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Run the selective scan; return y (b, t, e) in the dtype of x and the final state (b, e, n).

    Args:
      x: inputs (b, t, e).
      dt: step sizes (b, t, e), already positive (after softplus). dt = 0 leaves the state
        unchanged, which is how callers skip padded positions.
      A: state matrix diagonal (e, n), negative for a stable recurrence.
      B, C: input and output projections (b, t, n).
      h0: initial state (b, e, n); zeros when None.
      mode: one of `SCAN_MODES`.
      chunk_size: steps per chunk in `chunked` mode; need not divide the length.

    The final state is in the accumulation dtype: float32, or float64 for float64 inputs.
    """
    validate_scan_mode(mode)
    validate_chunk_size(chunk_size)
    if x.ndim != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must both be (b, t, e), got {x.shape} and {dt.shape}")
    batch, length, expanded = x.shape
    if length < 1:
        raise ValueError(f"x must have at least one time step, got shape {x.shape}")
    if A.ndim != 2 or A.shape[0] != expanded:
        raise ValueError(f"A must be (e, n) with e = {expanded}, got {A.shape}")
    state_size = A.shape[1]
    if B.shape != x.shape[:2] + (state_size,) or C.shape != B.shape:
        raise ValueError(
            f"B and C must be (b, t, n) = {x.shape[:2] + (state_size,)}, got {B.shape} and {C.shape}")
    if h0 is not None and h0.shape != (batch, expanded, state_size):
        raise ValueError(f"h0 must be (b, e, n) = {(batch, expanded, state_size)}, got {h0.shape}")

    accumulation = _accumulation_dtype(
        jnp.result_type(x, dt, A, B, C, *(() if h0 is None else (h0,))))
    x32, dt32, A32, B32, C32 = (jnp.asarray(array, accumulation) for array in (x, dt, A, B, C))
    if h0 is None:
        h0 = jnp.zeros((batch, expanded, state_size), accumulation)
    h0 = jnp.asarray(h0, accumulation)

    if mode == "associative":
        y, h_last = _associative_scan(x32, dt32, A32, B32, C32, h0)
    elif (mode == "cpu_kernel" and jax.default_backend() == "cpu"
          and accumulation != jnp.float32):
        # Raised on every CPU, whether or not the kernel could be built there.
        raise ValueError(f"scan mode 'cpu_kernel' computes in float32, got {accumulation} "
                         "inputs; use scan mode 'sequential'")
    elif mode == "sequential" or (mode == "cpu_kernel" and not _kernel_runs()):
        y, h_last = _sequential_scan(x32, dt32, A32, B32, C32, h0)
    elif mode == "cpu_kernel":
        y, h_last = cpu_kernel.selective_scan(x32, dt32, A32, B32, C32, h0)
    else:  # chunked
        y, h_last = _chunked_scan(x32, dt32, A32, B32, C32, h0, chunk_size)
    return y.astype(jnp.result_type(x)), h_last

