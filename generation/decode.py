"""Batched, compiled autoregressive decoding for any `models.LanguageModel`.

The model is split once with `nnx.split`. Prefill and the decode loop are pure functions of its
state under `jax.jit`, and the loop itself is a `lax.while_loop`, so no Python runs per token.
Each of the two functions traces once per combination of shapes and static settings.

Prompts of different lengths are left-padded into one batch with a mask that is False at the
padding. The model keeps padded positions out of its cache, so each prompt generates the same
tokens as when it runs alone.
"""

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from generation.sampling import SamplingConfig, sample_tokens

# Traces of each compiled function since import, counted by a Python side effect in the traced
# bodies. Tests use it to check that repeated calls with the same shapes do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated tokens of a batch.

    tokens: (b, max_new_tokens) int32. After a sequence emits the stop token, its later entries
        are `pad_token`; the stop token itself is kept at index `lengths[i]`.
    lengths: (b,) number of tokens generated before the stop token (all of them if none came).
    stopped: (b,) True where the sequence emitted the stop token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def token_lists(self) -> list[list[int]]:
        """Return each sequence's generated ids up to, not including, the stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def left_pad(prompts: Sequence[Sequence[int]], *, pad_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts of token ids to one length; return tokens (b, t) and mask (b, t).

    The mask is True at real tokens and False at padding.
    """
    if not prompts:
        raise ValueError("prompts must contain at least one prompt, got an empty list")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        empty = [i for i, n in enumerate(lengths) if n == 0]
        raise ValueError(f"every prompt needs at least one token; prompts {empty} are empty")

    num_positions = max(lengths)
    tokens_bt = np.full((len(prompts), num_positions), pad_token, np.int32)
    mask_bt = np.zeros((len(prompts), num_positions), bool)
    for i, prompt in enumerate(prompts):
        tokens_bt[i, num_positions - len(prompt):] = prompt
        mask_bt[i, num_positions - len(prompt):] = True
    return tokens_bt, mask_bt


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens_bt: jax.Array, mask_bt: jax.Array,
            *, max_len: int):
    """Run the prompts through a fresh cache of `max_len` positions.

    Returns the logits (b, vocab_size) at the last prompt position and the cache.
    """
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens_bt.shape[0], max_len)
    logits_btv, cache = model.prefill(tokens_bt, cache, mask=mask_bt)
    # Left padding puts every prompt's last real token in the last column.
    return logits_btv[:, -1], cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "stop_token", "pad_token"),
    donate_argnames=("cache",))
def decode_loop(graphdef: nnx.GraphDef, state: nnx.State, logits_bv: jax.Array, cache,
                key: jax.Array, sampling: dict[str, jax.Array], *, max_new_tokens: int,
                stop_token: int | None, pad_token: int):
    """Sample up to `max_new_tokens` tokens per sequence, starting from the prefill's logits.

    `sampling` contains the arrays of `SamplingConfig.as_arrays`. The loop ends early once every
    sequence has emitted `stop_token` (never when it is None).
    Returns tokens (b, max_new_tokens), lengths (b,), stopped (b,) and the cache.
    """
    TRACE_COUNTS["decode_loop"] += 1
    model = nnx.merge(graphdef, state)
    batch_size = logits_bv.shape[0]

    def keep_going(carry):
        index, _, _, done_b, _, _ = carry
        return (index < max_new_tokens) & ~jnp.all(done_b)

    def decode_one(carry):
        index, logits_bv, cache, done_b, tokens_bn, lengths_b = carry
        token_b = sample_tokens(logits_bv, jax.random.fold_in(key, index), **sampling)

        if stop_token is None:
            hit_stop_b = jnp.zeros_like(done_b)
        else:
            hit_stop_b = (token_b == stop_token) & ~done_b
        token_b = jnp.where(done_b, pad_token, token_b)
        tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, index))
        lengths_b = lengths_b + (~done_b & ~hit_stop_b).astype(jnp.int32)
        done_b = done_b | hit_stop_b

        logits_bv, cache = model.step(token_b, cache)
        return index + 1, logits_bv, cache, done_b, tokens_bn, lengths_b

    carry = (
        jnp.asarray(0, jnp.int32),
        logits_bv,
        cache,
        jnp.zeros((batch_size,), bool),
        jnp.full((batch_size, max_new_tokens), pad_token, jnp.int32),
        jnp.zeros((batch_size,), jnp.int32),
    )
    _, _, cache, done_b, tokens_bn, lengths_b = jax.lax.while_loop(keep_going, decode_one, carry)
    return tokens_bn, lengths_b, done_b, cache


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_token: int | None = None, pad_token: int = 0) -> GenerationResult:
    """Continue each prompt (a sequence of token ids) with up to `max_new_tokens` tokens.

    `model` is a `models.LanguageModel`. The prompts are left-padded into one batch; a sequence
    that emits `stop_token` emits `pad_token` from then on.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab_size = model.vocab_size
    sampling_arrays = sampling.as_arrays(vocab_size)
    for name, token in (("stop_token", stop_token), ("pad_token", pad_token)):
        if token is not None and not 0 <= token < vocab_size:
            raise ValueError(f"{name} must be in [0, {vocab_size}), got {token}")
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")

    tokens_bt, mask_bt = left_pad(prompts, pad_token=pad_token)
    graphdef, state = nnx.split(model)
    max_len = tokens_bt.shape[1] + max_new_tokens

    logits_bv, cache = prefill(graphdef, state, jnp.asarray(tokens_bt), jnp.asarray(mask_bt),
                               max_len=max_len)
    tokens_bn, lengths_b, stopped_b, _ = decode_loop(
        graphdef, state, logits_bv, cache, jax.random.key(seed), sampling_arrays,
        max_new_tokens=max_new_tokens, stop_token=stop_token, pad_token=pad_token)
    return GenerationResult(tokens=np.asarray(tokens_bn), lengths=np.asarray(lengths_b),
                            stopped=np.asarray(stopped_b))
