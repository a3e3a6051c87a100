"""Mamba: the selective state space mixer, its residual block and a language model built from it.

The architecture and initialisation are those of Gu and Dao, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces" (2023). Dimension letters are those of `models`.

The mixer runs in three modes on the same parameters:

- parallel forward over a whole sequence (`__call__`);
- prefill: a chunk of tokens that continues from a cache and returns the updated cache;
- step: one token per sequence, using the cache as a recurrent state.

The cache is fixed-size whatever the sequence length: the last d_conv - 1 inputs of the
convolution and the float32 SSM state (b, e, n).
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import RMSNorm
from models.lm import LanguageModel, build_blocks
from ssm import cpu_kernel
from ssm.scan import SCAN_MODES, selective_scan

DTYPE_NAMES = ("float32", "bfloat16")


def _dtype_name(field: str, value: Any) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in DTYPE_NAMES:
        raise ValueError(f"{field} must be one of {DTYPE_NAMES} (a name or a jnp dtype), got {value!r}")
    return name


def _require_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Hyperparameters of a Mamba language model.

    `dtype` (compute) and `param_dtype` (storage) accept "float32", "bfloat16" or the matching
    jnp dtypes, and are stored as those names. `compute_dtype` and `parameter_dtype` return the
    jnp dtypes. With bfloat16 compute the parameters stay in `param_dtype` (float32 by default),
    and the selective scan, exp(dt * A), softplus(dt) and the norms run in float32.
    """

    vocab_size: int  # tokens; the embedding table is padded up to `pad_vocab_size_multiple`
    d_model: int  # width of the residual stream
    num_layers: int  # Mamba blocks
    d_state: int = 16  # SSM state size N per channel
    expand: int = 2  # expansion factor: the mixer works on e = expand * d_model channels
    d_conv: int = 4  # kernel width of the causal depthwise convolution, in time steps
    dt_rank: int | str = "auto"  # rank of the dt projection, "auto" for ceil(d_model / 16)
    dt_min: float = 0.001  # dt at initialisation is log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # lower bound applied to the initial dt draw
    conv_bias: bool = True  # bias in the convolution
    bias: bool = False  # bias in in_proj and out_proj
    tie_embeddings: bool = True  # the output head reuses the embedding table
    pad_vocab_size_multiple: int = 8
    norm_eps: float = 1e-5  # RMSNorm epsilon
    scan: str = "associative"  # selective scan implementation, one of ssm.scan.SCAN_MODES
    chunk_size: int = 256  # time steps per chunk for scan="chunked"
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"  # parameter storage dtype
    selective: bool = True  # False: dt, B and C do not depend on the input (S4D-like contrast)

    def __post_init__(self):
        _require_int("vocab_size", self.vocab_size, 1)
        _require_int("d_model", self.d_model, 1)
        _require_int("num_layers", self.num_layers, 1)
        _require_int("d_state", self.d_state, 1)
        _require_int("expand", self.expand, 1)
        _require_int("d_conv", self.d_conv, 1)
        _require_int("pad_vocab_size_multiple", self.pad_vocab_size_multiple, 1)
        _require_int("chunk_size", self.chunk_size, 1)
        if self.dt_rank != "auto":
            _require_int("dt_rank", self.dt_rank, 1)
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                f"dt_max={self.dt_max}")
        if self.dt_init_floor < 0:
            raise ValueError(f"dt_init_floor must be >= 0, got {self.dt_init_floor}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.scan not in SCAN_MODES:
            raise ValueError(f"scan must be one of {SCAN_MODES}, got {self.scan!r}")
        # Checked on every backend, so that a config does not work on one machine only.
        if self.scan == "cpu_kernel" and self.d_state > cpu_kernel.STATE_SIZES[-1]:
            raise ValueError(
                f"scan 'cpu_kernel' supports d_state up to {cpu_kernel.STATE_SIZES[-1]}, got "
                f"{self.d_state}; use scan 'sequential'")
        object.__setattr__(self, "dtype", _dtype_name("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name("param_dtype", self.param_dtype))

    @property
    def d_inner(self) -> int:
        """Expanded width e of the mixer."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """Rank r of the dt projection, with "auto" resolved to ceil(d_model / 16)."""
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 16)
        return int(self.dt_rank)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


class MambaCache(NamedTuple):
    """Recurrent state of one mixer, of a size that does not grow with the sequence length."""

    conv_inputs: jax.Array  # (b, w - 1, e) last inputs of the convolution, compute dtype
    ssm_state: jax.Array  # (b, e, n) float32


def inverse_softplus(y: jax.Array) -> jax.Array:
    """Return x with softplus(x) = y, for y > 0."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
    """Initialiser for the dt bias: inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].

    The draw is floored at `dt_init_floor`, so softplus(bias) starts in [dt_min, dt_max] when
    the floor is below dt_min, as it is by default.
    """

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        return inverse_softplus(dt).astype(dtype)

    return init


def symmetric_uniform(bound: float):
    """Initialiser drawing uniformly from [-bound, bound]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class CausalConv1d(nnx.Module):
    """Depthwise convolution over time in which output t depends on inputs t - w + 1 .. t only.

    `kernel[w - 1]` multiplies the current input, matching PyTorch's `Conv1d` with left padding
    w - 1 and `groups = channels`. The window sum is accumulated in float32.
    """

    def __init__(self, features: int, kernel_size: int, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.kernel_size = kernel_size
        self.dtype = dtype
        # PyTorch's default Conv1d initialisation, for which a depthwise kernel has fan-in kernel_size.
        bound = 1.0 / math.sqrt(kernel_size)
        self.kernel = nnx.Param(
            symmetric_uniform(bound)(rngs.params(), (kernel_size, features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(
                symmetric_uniform(bound)(rngs.params(), (features,), param_dtype))
        else:
            self.bias = None

    def _add_bias(self, y: jax.Array) -> jax.Array:
        if self.bias is None:
            return y
        return y + self.bias[...].astype(jnp.float32)

    def __call__(self, x_bte: jax.Array, history_bwe: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Convolve x continuing from `history` (the previous w - 1 inputs); return y and the new history."""
        length = x_bte.shape[1]
        window = jnp.concatenate([history_bwe.astype(x_bte.dtype), x_bte], axis=1)
        kernel = self.kernel[...].astype(jnp.float32)

        y_bte = jnp.zeros(x_bte.shape, jnp.float32)
        for offset in range(self.kernel_size):
            y_bte = y_bte + window[:, offset:offset + length].astype(jnp.float32) * kernel[offset]
        y_bte = self._add_bias(y_bte).astype(self.dtype)

        return y_bte, window[:, length:]

    def next_history(self, x_bte: jax.Array, history_bwe: jax.Array) -> jax.Array:
        """Return the history that `__call__` returns for inputs x after `history`."""
        window = jnp.concatenate([history_bwe.astype(x_bte.dtype), x_bte], axis=1)
        return window[:, x_bte.shape[1]:]

    def step(self, x_be: jax.Array, history_bwe: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Convolve one input per sequence; return y (b, e) and the new history."""
        window = jnp.concatenate([history_bwe.astype(x_be.dtype), x_be[:, None]], axis=1)
        y_be = jnp.einsum("bwe,we->be", window.astype(jnp.float32),
                          self.kernel[...].astype(jnp.float32))
        return self._add_bias(y_be).astype(self.dtype), window[:, 1:]


class TimeInvariantSSMInputs(nnx.Module):
    """dt, B and C of the non-selective contrast: learned constants, shared by all time steps.

    `bias` is the dt bias (e,), so that dt = softplus(bias) per channel. B (n,) starts at 1 and
    C (n,) is drawn from a standard normal. Both are shared by all channels, as the input-dependent
    B and C of the selective mixer are, so the two variants differ only in selection.
    """

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        param_dtype = config.parameter_dtype
        self.bias = nnx.Param(dt_bias_init(config.dt_min, config.dt_max, config.dt_init_floor)(
            rngs.params(), (config.d_inner,), param_dtype))
        self.B = nnx.Param(jnp.ones((config.d_state,), param_dtype))
        self.C = nnx.Param(jax.random.normal(rngs.params(), (config.d_state,), param_dtype))


class MambaMixer(nnx.Module):
    """in_proj -> causal conv -> SiLU -> (dt, B, C) -> selective scan -> + D x -> * SiLU(z) -> out_proj."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = config.compute_dtype
        param_dtype = config.parameter_dtype
        d_model, d_inner, d_state = config.d_model, config.d_inner, config.d_state
        dt_rank = config.resolved_dt_rank

        self.in_proj = nnx.Linear(d_model, 2 * d_inner, use_bias=config.bias, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.conv1d = CausalConv1d(d_inner, config.d_conv, use_bias=config.conv_bias, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
        if config.selective:
            self.x_proj = nnx.Linear(d_inner, dt_rank + 2 * d_state, use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
            self.dt_proj = nnx.Linear(
                dt_rank, d_inner, dtype=dtype, param_dtype=param_dtype,
                kernel_init=symmetric_uniform(dt_rank ** -0.5),
                bias_init=dt_bias_init(config.dt_min, config.dt_max, config.dt_init_floor),
                rngs=rngs)
            self.time_invariant = None
        else:
            self.x_proj = None
            self.dt_proj = None
            self.time_invariant = TimeInvariantSSMInputs(config, rngs=rngs)

        # A = -exp(A_log) = -[1, 2, ..., N] in every channel, as in the Mamba paper.
        a_en = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
        self.A_log = nnx.Param(jnp.log(a_en).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((d_inner,), param_dtype))
        self.out_proj = nnx.Linear(d_inner, d_model, use_bias=config.bias, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch_size: int) -> MambaCache:
        """Return the cache of a sequence that has not started: zero conv inputs and state."""
        config = self.config
        return MambaCache(
            conv_inputs=jnp.zeros((batch_size, config.d_conv - 1, config.d_inner),
                                  config.compute_dtype),
            ssm_state=jnp.zeros((batch_size, config.d_inner, config.d_state), jnp.float32))

    def _A(self) -> jax.Array:
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _ssm_inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return dt (..., e) in float32 and B, C (..., n) for conv outputs x (..., e)."""
        if self.time_invariant is not None:
            params = self.time_invariant
            dt = jax.nn.softplus(params.bias[...].astype(jnp.float32))
            batch_shape = x.shape[:-1]
            B = jnp.broadcast_to(params.B[...].astype(jnp.float32), batch_shape + params.B.shape)
            C = jnp.broadcast_to(params.C[...].astype(jnp.float32), batch_shape + params.C.shape)
            return jnp.broadcast_to(dt, x.shape), B, C

        dt_raw, B, C = self._selective_inputs(x)
        # The bias is added in float32: around dt_min it is about -7, where bfloat16 keeps only
        # two significant digits and would move dt by several percent.
        return jax.nn.softplus(dt_raw + self.dt_proj.bias[...].astype(jnp.float32)), B, C

    def _selective_inputs(self, x: jax.Array, *, in_cpu_kernel: bool = False
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return dt before its bias and softplus (..., e) in float32, and B, C (..., n).

        With `in_cpu_kernel`, the two projections run through `cpu_kernel.project`.
        """
        dt_rank, d_state = self.config.resolved_dt_rank, self.config.d_state
        if in_cpu_kernel:
            projected = self._project(self.x_proj, x)
        else:
            projected = self.x_proj(x)
        dt_low = projected[..., :dt_rank]
        B = projected[..., dt_rank:dt_rank + d_state]
        C = projected[..., dt_rank + d_state:]
        kernel = self.dt_proj.kernel[...].astype(self.config.compute_dtype)
        if in_cpu_kernel:
            dt_raw = cpu_kernel.project(dt_low, kernel)
        else:
            dt_raw = jnp.einsum("...r,re->...e", dt_low, kernel)
        return dt_raw.astype(jnp.float32), B, C

    def _output(self, y: jax.Array, x: jax.Array, z: jax.Array) -> jax.Array:
        """Add the D skip connection, gate with SiLU(z) and project back to d_model."""
        y = y.astype(jnp.float32) + x.astype(jnp.float32) * self.D[...].astype(jnp.float32)
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return self.out_proj(y.astype(self.config.compute_dtype))

    def prefill(self, x_btd: jax.Array, cache: MambaCache, *, mask: jax.Array | None = None
                ) -> tuple[jax.Array, MambaCache]:
        """Run a chunk (b, t, d) in parallel, continuing from `cache`; return output and new cache.

        Positions where `mask` (b, t) is False get a zero conv input and dt = 0, so they leave
        the conv inputs seen by later tokens and the SSM state unchanged.
        """
        if mask is None and self._runs_gated_kernel():
            return self._prefill_with_gated_kernel(x_btd, cache)
        x_bte, z_bte, dt_bte, B_btn, C_btn, conv_inputs = self._chunk_scan_inputs(
            x_btd, cache.conv_inputs, mask)
        y_bte, ssm_state = selective_scan(
            x_bte, dt_bte, self._A(), B_btn, C_btn, h0=cache.ssm_state, mode=self.config.scan,
            chunk_size=self.config.chunk_size)

        return self._output(y_bte, x_bte, z_bte), MambaCache(conv_inputs, ssm_state)

    def _runs_gated_kernel(self) -> bool:
        """Return whether prefill runs `cpu_kernel.gated_selective_scan`.

        It does in scan mode cpu_kernel, in the selective mixer, on a CPU where the kernel was
        built. With a mask, the cpu_kernel mode runs only the scan.
        """
        return (self.config.scan == "cpu_kernel" and self.config.selective
                and jax.default_backend() == "cpu" and cpu_kernel.available())

    def _prefill_with_gated_kernel(self, x_btd, cache):
        """`prefill` without a mask, with the step size, scan, D skip and gate in one kernel,
        and in float32 with whole blocks of 16 channels, the conv and SiLU in another. The
        projections run through `cpu_kernel.project` (in_proj only in that float32 case)."""
        config = self.config

        def f32(array):
            return array.astype(jnp.float32)

        if config.compute_dtype == jnp.float32 and config.d_inner % cpu_kernel.LANES == 0:
            xz_bte = self._project(self.in_proj, x_btd)
            conv = self.conv1d
            bias = (conv.bias[...] if conv.bias is not None
                    else jnp.zeros(conv.kernel.shape[1:], conv.kernel.dtype))
            x_bte, z_bte = cpu_kernel.causal_conv_silu(
                xz_bte, f32(conv.kernel[...]), f32(bias), f32(cache.conv_inputs))
            conv_inputs = conv.next_history(xz_bte[..., :config.d_inner], cache.conv_inputs)
        else:
            x_bte, z_bte, conv_inputs = self._conv_outputs(x_btd, cache.conv_inputs, None)
        dt_raw, B_btn, C_btn = self._selective_inputs(x_bte, in_cpu_kernel=True)

        out_bte, ssm_state = cpu_kernel.gated_selective_scan(
            f32(x_bte), dt_raw, f32(self.dt_proj.bias[...]), self._A(), f32(B_btn), f32(C_btn),
            f32(self.D[...]), f32(z_bte), cache.ssm_state)
        out_btd = self._project(self.out_proj, out_bte)
        return out_btd, MambaCache(conv_inputs, ssm_state)

    def _project(self, linear: nnx.Linear, x):
        """Return `linear(x)`, computed by `cpu_kernel.project`."""
        dtype = self.config.compute_dtype
        y = cpu_kernel.project(x.astype(dtype), linear.kernel[...].astype(dtype))
        return y if linear.bias is None else y + linear.bias[...].astype(dtype)

    def _conv_outputs(self, x_btd, conv_inputs, mask):
        """Return x after in_proj, the causal conv and SiLU, the gate z, and the new conv inputs."""
        xz_bte = self.in_proj(x_btd)
        x_bte, z_bte = jnp.split(xz_bte, 2, axis=-1)
        if mask is not None:
            x_bte = jnp.where(mask[..., None], x_bte, 0)

        x_bte, conv_inputs = self.conv1d(x_bte, conv_inputs)
        return jax.nn.silu(x_bte), z_bte, conv_inputs

    def _chunk_scan_inputs(self, x_btd, conv_inputs, mask):
        """Return x, the gate z, dt, B and C of a chunk (b, t, d), and the new conv inputs."""
        x_bte, z_bte, conv_inputs = self._conv_outputs(x_btd, conv_inputs, mask)
        dt_bte, B_btn, C_btn = self._ssm_inputs(x_bte)
        if mask is not None:
            dt_bte = jnp.where(mask[..., None], dt_bte, 0.0)
        return x_bte, z_bte, dt_bte, B_btn, C_btn, conv_inputs

    def scan_inputs(self, x_btd: jax.Array) -> tuple[jax.Array, ...]:
        """Return the inputs x (b, t, e), dt (b, t, e), A (e, n), B and C (b, t, n) of the
        selective scan that `__call__` runs on the sequence x_btd (for probes such as the
        implicit attention).
        """
        conv_inputs = self.init_cache(x_btd.shape[0]).conv_inputs
        x_bte, _, dt_bte, B_btn, C_btn, _ = self._chunk_scan_inputs(x_btd, conv_inputs, None)
        return x_bte, dt_bte, self._A(), B_btn, C_btn

    def __call__(self, x_btd: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Run a whole sequence (b, t, d) from an empty cache; return the output (b, t, d)."""
        y_btd, _ = self.prefill(x_btd, self.init_cache(x_btd.shape[0]), mask=mask)
        return y_btd

    def step(self, x_bd: jax.Array, cache: MambaCache) -> tuple[jax.Array, MambaCache]:
        """Advance one token per sequence (b, d) with the recurrence; return output and cache.

        This is the plain recurrent form, written without `selective_scan`, so that tests can
        hold it equal to the parallel forward.
        """
        xz_be = self.in_proj(x_bd)
        x_be, z_be = jnp.split(xz_be, 2, axis=-1)

        x_be, conv_inputs = self.conv1d.step(x_be, cache.conv_inputs)
        x_be = jax.nn.silu(x_be)

        dt_be, B_bn, C_bn = self._ssm_inputs(x_be)
        x32 = x_be.astype(jnp.float32)
        decay_ben = jnp.exp(dt_be[..., None] * self._A())  # float32: decays near 1 need the bits
        input_ben = (dt_be * x32)[..., None] * B_bn.astype(jnp.float32)[:, None, :]
        ssm_state = decay_ben * cache.ssm_state + input_ben
        y_be = jnp.einsum("ben,bn->be", ssm_state, C_bn.astype(jnp.float32))

        return self._output(y_be, x_be, z_be), MambaCache(conv_inputs, ssm_state)


class MambaBlock(nnx.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x)), with the residual stream in float32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=config.compute_dtype,
                            param_dtype=config.parameter_dtype)
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, x_btd: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        return x_btd + self.mixer(self.norm(x_btd), mask=mask).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_len: int) -> MambaCache:
        """Return an empty cache; `max_len` is accepted for the block interface and not needed."""
        del max_len
        return self.mixer.init_cache(batch_size)

    def prefill(self, x_btd: jax.Array, cache: MambaCache, *, mask: jax.Array | None = None
                ) -> tuple[jax.Array, MambaCache]:
        y_btd, cache = self.mixer.prefill(self.norm(x_btd), cache, mask=mask)
        return x_btd + y_btd.astype(jnp.float32), cache

    def step(self, x_bd: jax.Array, cache: MambaCache) -> tuple[jax.Array, MambaCache]:
        y_bd, cache = self.mixer.step(self.norm(x_bd), cache)
        return x_bd + y_bd.astype(jnp.float32), cache


def build_language_model(config: MambaConfig, *, rngs: nnx.Rngs) -> LanguageModel:
    """Build a Mamba language model: embedding, `num_layers` Mamba blocks, RMSNorm, head."""
    blocks = build_blocks(config.num_layers, lambda _: MambaBlock(config, rngs=rngs))
    final_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=config.compute_dtype,
                         param_dtype=config.parameter_dtype)
    return LanguageModel(
        vocab_size=config.vocab_size, d_model=config.d_model, blocks=blocks,
        final_norm=final_norm, tie_embeddings=config.tie_embeddings,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple, dtype=config.compute_dtype,
        param_dtype=config.parameter_dtype, rngs=rngs)
