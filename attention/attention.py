"""Causal multi-head self-attention with grouped-query heads, positions and a key/value cache.

The full forward pass over a sequence is the reference for cached decoding: `prefill` and `step`
write keys and values into a fixed-size cache and attend over it, and tests hold both equal.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attention.config import TransformerConfig
from attention.positions import apply_rope, positions_from_mask


class KeyValueCache(NamedTuple):
    """Keys and values of the tokens seen so far by one attention layer, in fixed-size slots.

    Every token takes one slot, padded or not, so `index` is the same for all sequences and moves
    by exactly one per token. `key_mask` marks the slots of real tokens, and `positions` counts the
    real tokens of each sequence, which is the rotary position of its next real token.
    """

    key: jax.Array  # (b, s, g, k) compute dtype
    value: jax.Array  # (b, s, g, k) compute dtype
    key_mask: jax.Array  # (b, s) bool, True at slots that hold a real token
    positions: jax.Array  # (b,) int32, real tokens so far per sequence
    index: jax.Array  # () int32, next slot to write

    @property
    def max_len(self) -> int:
        return self.key.shape[1]


def check_cache_capacity(cache: KeyValueCache, num_new_tokens: int) -> None:
    """Raise ValueError if `num_new_tokens` more tokens do not fit in `cache`.

    The chunk length is static, so a chunk longer than the cache always raises. The slot index is
    checked only when it is a concrete value (eager calls). Under `jax.jit` it is traced and cannot
    be read, so `CausalSelfAttention.prefill` returns NaN outputs for a chunk that does not fit.
    """
    if num_new_tokens > cache.max_len:
        raise ValueError(
            f"a chunk of {num_new_tokens} tokens does not fit in a key/value cache of "
            f"max_len={cache.max_len}; create the cache with a larger max_len")
    if isinstance(cache.index, jax.core.Tracer):
        return
    used = int(cache.index)
    if used + num_new_tokens > cache.max_len:
        raise ValueError(
            f"key/value cache is full: {used} of max_len={cache.max_len} slots are used and "
            f"{num_new_tokens} more tokens do not fit; create the cache with a larger max_len")


class CausalSelfAttention(nnx.Module):
    """Causal self-attention with `num_kv_heads` key/value heads shared by groups of query heads.

    Scores, softmax and the mask are computed in float32 whatever the compute dtype. Query head i
    uses key/value head i // (num_heads / num_kv_heads), the grouping of the Hugging Face Llama
    implementation.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, k = config.d_model, config.head_dim
        # GPT-2 initialisation: std 0.02, and the output projection, which writes into the
        # residual stream, scaled by 1 / sqrt(2 * num_layers).
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * config.num_layers))

        def linear(in_features, out_features, kernel_init):
            return nnx.Linear(
                in_features, out_features, use_bias=config.attention_bias, dtype=config.dtype,
                param_dtype=config.param_dtype, kernel_init=kernel_init, rngs=rngs)

        self.query_proj = linear(d, config.num_heads * k, init)
        self.key_proj = linear(d, config.num_kv_heads * k, init)
        self.value_proj = linear(d, config.num_kv_heads * k, init)
        self.out_proj = linear(config.num_heads * k, d, out_init)

    def __call__(self, x_btd: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Attend causally over the whole sequence x (b, t, d) and return (b, t, d)."""
        out_btd, _ = self.forward_with_weights(x_btd, mask=mask)
        return out_btd

    def forward_with_weights(self, x_btd: jax.Array, *, mask: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array]:
        """Return the output (b, t, d) and the float32 attention weights (b, h, t, t)."""
        b, t, _ = x_btd.shape
        mask_bt = _validated_mask(mask, b, t)
        positions_bt = positions_from_mask(mask_bt)
        q_bthk, k_btgk, v_btgk = self._project(x_btd, positions_bt)

        causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
        allowed_bts = causal_ts[None] & mask_bt[:, None, :]
        return self._attend(q_bthk, k_btgk, v_btgk, allowed_bts)

    def init_cache(self, batch_size: int, max_len: int) -> KeyValueCache:
        """Return an empty cache for `batch_size` sequences of up to `max_len` tokens in all."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(
                f"batch_size and max_len must be >= 1, got batch_size={batch_size}, "
                f"max_len={max_len}")
        shape = (batch_size, max_len, self.config.num_kv_heads, self.config.head_dim)
        return KeyValueCache(
            key=jnp.zeros(shape, self.config.dtype),
            value=jnp.zeros(shape, self.config.dtype),
            key_mask=jnp.zeros((batch_size, max_len), bool),
            positions=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def prefill(self, x_btd: jax.Array, cache: KeyValueCache, *, mask: jax.Array | None = None
                ) -> tuple[jax.Array, KeyValueCache]:
        """Attend a chunk x (b, t, d) that continues from `cache`, returning output and new cache.

        Raises ValueError when the chunk does not fit (see `check_cache_capacity`). Under
        `jax.jit` the whole chunk's outputs are NaN instead, and so are those of later calls.
        """
        b, t, _ = x_btd.shape
        check_cache_capacity(cache, t)
        mask_bt = _validated_mask(mask, b, t)
        positions_bt = positions_from_mask(mask_bt, cache.positions)
        q_bthk, k_btgk, v_btgk = self._project(x_btd, positions_bt)

        start = (0, cache.index, 0, 0)
        new_cache = KeyValueCache(
            key=jax.lax.dynamic_update_slice(cache.key, k_btgk.astype(cache.key.dtype), start),
            value=jax.lax.dynamic_update_slice(cache.value, v_btgk.astype(cache.value.dtype),
                                               start),
            key_mask=jax.lax.dynamic_update_slice(cache.key_mask, mask_bt, (0, cache.index)),
            positions=cache.positions + jnp.sum(mask_bt, axis=1, dtype=jnp.int32),
            index=cache.index + t,
        )

        # Query i is in slot index + i and attends to the real tokens in slots up to its own.
        query_slots_t = cache.index + jnp.arange(t)
        causal_ts = jnp.arange(cache.max_len)[None, :] <= query_slots_t[:, None]
        allowed_bts = causal_ts[None] & new_cache.key_mask[:, None, :]
        out_btd, _ = self._attend(q_bthk, new_cache.key, new_cache.value, allowed_bts)

        # dynamic_update_slice clamps an out-of-range start and overwrites earlier slots, so a
        # chunk that does not fit gets NaN outputs. Only reachable under jit, where no check ran.
        fits = cache.index + t <= cache.max_len
        out_btd = jnp.where(fits, out_btd, jnp.nan)
        return out_btd, new_cache

    def step(self, x_bd: jax.Array, cache: KeyValueCache) -> tuple[jax.Array, KeyValueCache]:
        """Decode one real token per sequence, x (b, d), returning output (b, d) and new cache."""
        out_b1d, cache = self.prefill(x_bd[:, None, :], cache)
        return out_b1d[:, 0, :], cache

    def _project(self, x_btd: jax.Array, positions_bt: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return queries (b, t, h, k), keys and values (b, t, g, k), rotated if using RoPE."""
        config = self.config
        b, t, _ = x_btd.shape
        x_btd = x_btd.astype(config.dtype)
        q_bthk = self.query_proj(x_btd).reshape(b, t, config.num_heads, config.head_dim)
        k_btgk = self.key_proj(x_btd).reshape(b, t, config.num_kv_heads, config.head_dim)
        v_btgk = self.value_proj(x_btd).reshape(b, t, config.num_kv_heads, config.head_dim)

        if config.positions == "rope":
            q_bthk = apply_rope(q_bthk, positions_bt, base=config.rope_base)
            k_btgk = apply_rope(k_btgk, positions_bt, base=config.rope_base)
        return q_bthk, k_btgk, v_btgk

    def _attend(self, q_bthk: jax.Array, k_bsgk: jax.Array, v_bsgk: jax.Array,
                allowed_bts: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Return the projected output (b, t, d) and the float32 weights (b, h, t, s)."""
        config = self.config
        b, t = q_bthk.shape[:2]

        # Each key/value head serves heads_per_kv_head consecutive query heads.
        k_bshk = jnp.repeat(k_bsgk, config.heads_per_kv_head, axis=2)
        v_bshk = jnp.repeat(v_bsgk, config.heads_per_kv_head, axis=2)

        # Scores and softmax in float32, because bfloat16 keeps 8 significant bits, too few for
        # the differences between scores and for the softmax sum.
        scores_bhts = jnp.einsum("bthk,bshk->bhts", q_bthk, k_bshk,
                                 preferred_element_type=jnp.float32)
        scores_bhts = scores_bhts / math.sqrt(config.head_dim)
        # A finite minimum (not -inf) keeps rows with no allowed key (queries at left padding)
        # free of NaN. Their outputs are never seen by real tokens.
        scores_bhts = jnp.where(allowed_bts[:, None], scores_bhts,
                                jnp.finfo(jnp.float32).min)
        weights_bhts = jax.nn.softmax(scores_bhts, axis=-1)

        out_bthk = jnp.einsum("bhts,bshk->bthk", weights_bhts.astype(config.dtype), v_bshk)
        out_btd = self.out_proj(out_bthk.reshape(b, t, config.num_heads * config.head_dim))
        return out_btd, weights_bhts


def _validated_mask(mask: jax.Array | None, batch_size: int, length: int) -> jax.Array:
    """Return `mask` as bool (b, t), or all True when it is None."""
    if mask is None:
        return jnp.ones((batch_size, length), bool)
    if mask.shape != (batch_size, length):
        raise ValueError(
            f"mask must have shape (batch, time) = {(batch_size, length)} like the tokens, "
            f"got {mask.shape}")
    return mask.astype(bool)
