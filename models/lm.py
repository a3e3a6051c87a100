"""One language model for every architecture: embedding, residual blocks, final norm, head.

A block is any `nnx.Module` with this interface (both `ssm.MambaBlock` and the blocks in
`attention.transformer` follow it). `x` is the residual stream, kept in float32 between blocks:

  block(x_btd, *, mask=None) -> x_btd                  parallel forward over a whole sequence
  block.init_cache(batch_size, max_len) -> cache       empty cache, a pytree of arrays
  block.prefill(x_btd, cache, *, mask=None) -> (x_btd, cache)
                                                       a chunk of tokens continuing from `cache`
  block.step(x_bd, cache) -> (x_bd, cache)             one token per sequence

`mask` (b, t) is True at real tokens and False at padding (left padding in generation); padded
positions must not change the state that later tokens see.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Cache = Any


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round `vocab_size` up to a multiple of `multiple` (matrix shapes that tile well)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if multiple < 1:
        raise ValueError(f"pad_vocab_size_multiple must be >= 1, got {multiple}")
    return -(-vocab_size // multiple) * multiple


class LanguageModel(nnx.Module):
    """Token ids in, float32 logits out, with the same cache interface for every architecture.

    The embedding table has `padded_vocab_size` rows; logits are returned for the first
    `vocab_size` entries only, so padded entries can never be predicted or sampled.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        blocks: Sequence[nnx.Module],
        final_norm: nnx.Module,
        tie_embeddings: bool = True,
        pad_vocab_size_multiple: int = 1,
        embedding_init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(vocab_size, pad_vocab_size_multiple)
        self.d_model = d_model
        self.tie_embeddings = tie_embeddings
        self.dtype = dtype

        self.embedding = nnx.Embed(
            self.padded_vocab_size, d_model, dtype=jnp.float32, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(embedding_init_std), rngs=rngs)
        self.blocks = nnx.List(blocks)
        self.final_norm = final_norm
        if tie_embeddings:
            self.head = None
        else:
            self.head = nnx.Linear(
                d_model, self.padded_vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nnx.initializers.normal(embedding_init_std), rngs=rngs)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        # The residual stream stays float32 so that many small block updates are not rounded away.
        return self.embedding(tokens).astype(jnp.float32)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x).astype(self.dtype)
        if self.head is None:
            table = self.embedding.embedding[...].astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", x, table)
        else:
            logits = self.head(x)
        return logits[..., : self.vocab_size].astype(jnp.float32)

    def __call__(self, tokens_bt: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Return logits (b, t, vocab_size) for token ids (b, t)."""
        x = self._embed(tokens_bt)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_len: int) -> tuple[Cache, ...]:
        """Return an empty cache for `batch_size` sequences of up to `max_len` tokens in all."""
        return tuple(block.init_cache(batch_size, max_len) for block in self.blocks)

    def prefill(self, tokens_bt: jax.Array, cache: tuple[Cache, ...], *,
                mask: jax.Array | None = None) -> tuple[jax.Array, tuple[Cache, ...]]:
        """Run a chunk of tokens (b, t) that continues from `cache`; return logits and new cache."""
        x = self._embed(tokens_bt)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.prefill(x, block_cache, mask=mask)
            new_cache.append(block_cache)
        return self._logits(x), tuple(new_cache)

    def step(self, tokens_b: jax.Array, cache: tuple[Cache, ...]
             ) -> tuple[jax.Array, tuple[Cache, ...]]:
        """Decode one token per sequence (b,); return logits (b, vocab_size) and the new cache."""
        x = self._embed(tokens_b)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.step(x, block_cache)
            new_cache.append(block_cache)
        return self._logits(x), tuple(new_cache)


def build_blocks(num_layers: int, make_block: Callable[[int], nnx.Module]) -> list[nnx.Module]:
    """Build `num_layers` blocks with `make_block(layer_index)`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return [make_block(i) for i in range(num_layers)]
