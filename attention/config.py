"""Configuration of the Transformer baseline, validated when it is built."""

import dataclasses
from typing import Any

import jax.numpy as jnp

FLAVOURS = ("transformer++", "classic")
POSITION_ENCODINGS = ("rope", "sinusoidal", "none")

# Positions and biases that each flavour uses unless the config sets them.
DEFAULT_POSITIONS = {"transformer++": "rope", "classic": "sinusoidal"}
DEFAULT_BIAS = {"transformer++": False, "classic": True}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and choices of a decoder-only Transformer language model.

    `transformer++` is the Llama layout that the Mamba paper (Gu and Dao, 2023) uses as its
    baseline: RMSNorm, SwiGLU feed-forward, rotary positions, no biases. `classic` is the GPT-2
    style pre-norm layout with LayerNorm, GELU feed-forward, biases and sinusoidal positions.
    Fields left as None are filled in `__post_init__` from the others.
    """

    vocab_size: int
    d_model: int  # Width of the residual stream.
    num_layers: int
    num_heads: int  # Query heads.
    num_kv_heads: int | None = None  # Key/value heads (grouped-query), default num_heads.
    head_dim: int | None = None  # Channels per head, default d_model // num_heads.
    ffn_dim: int | None = None  # Feed-forward width, default from `_default_ffn_dim`.
    flavour: str = "transformer++"
    positions: str | None = None  # "rope", "sinusoidal" or "none", default by flavour.
    rope_base: float = 10000.0  # RoPE frequencies are rope_base^(-2i/head_dim).
    attention_bias: bool | None = None  # Biases on the query/key/value/output projections.
    mlp_bias: bool | None = None  # Biases on the feed-forward projections.
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # Output head reuses the embedding table.
    pad_vocab_size_multiple: int = 1
    max_len: int = 2048  # Maximum sequence or cache length with sinusoidal positions only.
    attention_only: bool = False  # Blocks without the feed-forward sublayer (and its norm).
    dtype: Any = jnp.float32  # Compute dtype of projections and attention.
    param_dtype: Any = jnp.float32  # Storage dtype of parameters.

    def __post_init__(self):
        self._validate_choices()
        self._fill_defaults()
        self._validate_sizes()

    def _validate_choices(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        if self.positions is not None and self.positions not in POSITION_ENCODINGS:
            raise ValueError(
                f"positions must be one of {POSITION_ENCODINGS}, got {self.positions!r}")

    def _fill_defaults(self):
        # The dataclass is frozen, so defaults are written with object.__setattr__.
        defaults = {
            "positions": DEFAULT_POSITIONS[self.flavour],
            "attention_bias": DEFAULT_BIAS[self.flavour],
            "mlp_bias": DEFAULT_BIAS[self.flavour],
            "num_kv_heads": self.num_heads,
            "ffn_dim": _default_ffn_dim(self.flavour, self.d_model),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        if self.head_dim is None:
            if self.num_heads >= 1 and self.d_model % self.num_heads:
                raise ValueError(
                    f"num_heads must divide d_model={self.d_model} when head_dim is not given, "
                    f"got num_heads={self.num_heads}. Allowed: divisors of d_model")
            object.__setattr__(self, "head_dim", self.d_model // max(self.num_heads, 1))

    def _validate_sizes(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_dim", "pad_vocab_size_multiple", "max_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads must divide num_heads={self.num_heads}, got "
                f"num_kv_heads={self.num_kv_heads}. Allowed: divisors of num_heads")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"head_dim must be even with positions='rope' (channels rotate in pairs), "
                f"got head_dim={self.head_dim}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"d_model must be even with positions='sinusoidal' (sin and cos channels), "
                f"got d_model={self.d_model}")

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads


def _default_ffn_dim(flavour: str, d_model: int) -> int:
    """Return 4 * d_model for GELU, or 8/3 * d_model rounded up to a multiple of 8 for SwiGLU.

    SwiGLU has three matrices instead of two, so 8/3 * d_model keeps the parameter count of the
    4 * d_model GELU feed-forward.
    """
    if flavour == "classic":
        return 4 * d_model
    return 8 * -(-d_model // 3)
