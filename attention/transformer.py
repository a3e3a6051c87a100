"""Pre-norm Transformer blocks (Transformer++ and classic) and the language model built from them.

The blocks follow the block interface of `models.lm`: the residual stream x is float32 between
blocks, and each sublayer computes in the config's compute dtype.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attention.attention import CausalSelfAttention, KeyValueCache
from attention.config import TransformerConfig
from attention.positions import positions_from_mask, sinusoidal_encoding
from models.layers import RMSNorm
from models.lm import LanguageModel, build_blocks


class SwiGLU(nnx.Module):
    """Feed-forward down(silu(gate(x)) * up(x)) of Shazeer (2020), as in Llama."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.ffn_dim
        self.gate_proj = _linear(config, d, f, std=0.02, rngs=rngs)
        self.up_proj = _linear(config, d, f, std=0.02, rngs=rngs)
        self.down_proj = _linear(config, f, d, std=_output_std(config), rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        hidden_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        return self.down_proj(hidden_btf)


class GeluMLP(nnx.Module):
    """Feed-forward down(gelu(up(x))) of GPT-2, with the tanh approximation of GELU."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.ffn_dim
        self.up_proj = _linear(config, d, f, std=0.02, rngs=rngs)
        self.down_proj = _linear(config, f, d, std=_output_std(config), rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.up_proj(x_btd), approximate=True))


def _linear(config: TransformerConfig, in_features: int, out_features: int, *, std: float,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=config.mlp_bias, dtype=config.dtype,
        param_dtype=config.param_dtype, kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _output_std(config: TransformerConfig) -> float:
    # Projections that write into the residual stream shrink with depth (GPT-2 initialisation).
    return 0.02 / math.sqrt(2 * config.num_layers)


def make_norm(config: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Return RMSNorm (Transformer++) or LayerNorm with bias (classic), float32 statistics."""
    if config.flavour == "transformer++":
        return RMSNorm(config.d_model, eps=config.norm_eps, dtype=config.dtype,
                       param_dtype=config.param_dtype)
    # nnx.LayerNorm promotes its mean and variance to at least float32.
    return nnx.LayerNorm(config.d_model, epsilon=config.norm_eps, dtype=config.dtype,
                         param_dtype=config.param_dtype, rngs=rngs)


class TransformerBlock(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x)).

    With sinusoidal positions, the first block (layer_index 0) adds the encoding, divided by
    sqrt(d_model), to the residual stream before anything else. That equals adding it to the
    embedding, and the block already tracks each sequence's positions (mask and cache).
    """

    def __init__(self, config: TransformerConfig, *, layer_index: int, rngs: nnx.Rngs):
        self.config = config
        self.adds_sinusoidal_positions = config.positions == "sinusoidal" and layer_index == 0
        self.attention_norm = make_norm(config, rngs=rngs)
        self.attention = CausalSelfAttention(config, rngs=rngs)
        if config.attention_only:
            self.ffn_norm = None
            self.feed_forward = None
            return
        self.ffn_norm = make_norm(config, rngs=rngs)
        if config.flavour == "transformer++":
            self.feed_forward = SwiGLU(config, rngs=rngs)
        else:
            self.feed_forward = GeluMLP(config, rngs=rngs)

    def __call__(self, x_btd: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x_btd, _ = self.forward_with_weights(x_btd, mask=mask)
        return x_btd

    def forward_with_weights(self, x_btd: jax.Array, *, mask: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array]:
        """Return the block output (b, t, d) and its attention weights (b, h, t, t), float32."""
        if self.adds_sinusoidal_positions:
            x_btd = self._add_positions(x_btd, mask, start_b=None)
        attention_out, weights_bhts = self.attention.forward_with_weights(
            self.attention_norm(x_btd), mask=mask)
        x_btd = x_btd + attention_out.astype(jnp.float32)
        return self._feed_forward_residual(x_btd), weights_bhts

    def init_cache(self, batch_size: int, max_len: int) -> KeyValueCache:
        if self.adds_sinusoidal_positions and max_len > self.config.max_len:
            raise ValueError(
                f"cache length max_len={max_len} exceeds the TransformerConfig's max_len="
                f"{self.config.max_len} (model.max_len in a training config), the longest "
                "sequence that sinusoidal positions encode; raise it")
        return self.attention.init_cache(batch_size, max_len)

    def prefill(self, x_btd: jax.Array, cache: KeyValueCache, *, mask: jax.Array | None = None
                ) -> tuple[jax.Array, KeyValueCache]:
        if self.adds_sinusoidal_positions:
            x_btd = self._add_positions(x_btd, mask, start_b=cache.positions)
        attention_out, cache = self.attention.prefill(self.attention_norm(x_btd), cache,
                                                      mask=mask)
        x_btd = x_btd + attention_out.astype(jnp.float32)
        return self._feed_forward_residual(x_btd), cache

    def step(self, x_bd: jax.Array, cache: KeyValueCache) -> tuple[jax.Array, KeyValueCache]:
        x_b1d, cache = self.prefill(x_bd[:, None, :], cache)
        return x_b1d[:, 0, :], cache

    def _feed_forward_residual(self, x_btd: jax.Array) -> jax.Array:
        if self.feed_forward is None:
            return x_btd
        return x_btd + self.feed_forward(self.ffn_norm(x_btd)).astype(jnp.float32)

    def _add_positions(self, x_btd: jax.Array, mask: jax.Array | None,
                       start_b: jax.Array | None) -> jax.Array:
        b, t, d = x_btd.shape
        if start_b is None and t > self.config.max_len:
            raise ValueError(
                f"sequence length {t} exceeds the TransformerConfig's max_len="
                f"{self.config.max_len} (model.max_len in a training config), the longest "
                "sequence that sinusoidal positions encode; raise it")
        mask_bt = jnp.ones((b, t), bool) if mask is None else mask
        positions_bt = positions_from_mask(mask_bt, start_b)

        # Vaswani et al. multiply the embedding by sqrt(d_model) to match the encoding's unit
        # amplitude. LanguageModel embeds without that factor (init std 0.02), so the encoding
        # is divided by sqrt(d_model) instead. Unscaled, it drowns the token signal, and the
        # copying test in tests/test_transformer.py does not learn.
        return x_btd + sinusoidal_encoding(positions_bt, d) / math.sqrt(d)


def build_language_model(config: TransformerConfig, *, rngs: nnx.Rngs) -> LanguageModel:
    """Build a Transformer language model: embedding, `num_layers` blocks, final norm, head."""
    blocks = build_blocks(
        config.num_layers,
        lambda layer_index: TransformerBlock(config, layer_index=layer_index, rngs=rngs))
    return LanguageModel(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        blocks=blocks,
        final_norm=make_norm(config, rngs=rngs),
        tie_embeddings=config.tie_embeddings,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )


def attention_weights(model: LanguageModel, tokens_bt: jax.Array, *,
                      mask: jax.Array | None = None) -> list[jax.Array]:
    """Return the attention weights of every layer, each (b, h, t, t) float32, for inspection.

    Runs the same blocks as `model(tokens_bt)`, so the weights are those of the normal forward.
    """
    if not all(isinstance(block, TransformerBlock) for block in model.blocks):
        raise ValueError("attention_weights needs a model whose blocks are all TransformerBlock")
    # LanguageModel's own embedding step, so that the weights follow any change to it.
    x_btd = model._embed(tokens_bt)
    weights = []
    for block in model.blocks:
        x_btd, weights_bhts = block.forward_with_weights(x_btd, mask=mask)
        weights.append(weights_bhts)
    return weights
