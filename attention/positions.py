"""Position encodings: rotary (RoPE) on queries and keys, sinusoidal added to the residual stream.

Both take explicit per-token positions (b, t), so that left-padded sequences and cached decoding
use the number of real tokens before each token, not its index in the array.
"""

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, base: float) -> jax.Array:
    """Return the rotation frequencies base^(-2i/head_dim) for i in [0, head_dim / 2), float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base ** exponents)


def rotate_half(x: jax.Array) -> jax.Array:
    """Map the halves (x1, x2) of the last axis to (-x2, x1), the Llama (GPT-NeoX) convention."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_bthk: jax.Array, positions_bt: jax.Array, *, base: float) -> jax.Array:
    """Rotate queries or keys (b, t, heads, k) by their positions (b, t), keeping x's dtype.

    Channel i and channel i + k/2 form one rotated pair with frequency base^(-2i/k), as in the
    Hugging Face Llama implementation, so that weights imported from it give the same outputs.
    """
    head_dim = x_bthk.shape[-1]
    inverse_frequencies_k = rope_inverse_frequencies(head_dim, base)

    # Angles in float32: position * frequency loses whole turns in bfloat16 beyond a few hundred.
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * inverse_frequencies_k
    angles_btk = jnp.concatenate([angles_btk, angles_btk], axis=-1)
    cos_bt1k = jnp.cos(angles_btk)[:, :, None, :]
    sin_bt1k = jnp.sin(angles_btk)[:, :, None, :]

    x32 = x_bthk.astype(jnp.float32)
    rotated = x32 * cos_bt1k + rotate_half(x32) * sin_bt1k
    return rotated.astype(x_bthk.dtype)


def sinusoidal_encoding(positions_bt: jax.Array, d_model: int) -> jax.Array:
    """Return the encoding of "Attention Is All You Need" (Vaswani et al., 2017), (b, t, d) float32.

    Even channel 2i is sin(pos / 10000^(2i/d)) and odd channel 2i + 1 is cos of the same angle.
    The values are computed from the formula, so any position works.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoidal positions, got {d_model}")
    exponents = jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model
    angles_bti = positions_bt.astype(jnp.float32)[..., None] / (10000.0 ** exponents)

    # Interleave: stack (sin, cos) on a new last axis, then flatten pairs into channels.
    pairs_bti2 = jnp.stack([jnp.sin(angles_bti), jnp.cos(angles_bti)], axis=-1)
    return pairs_bti2.reshape(*positions_bt.shape, d_model)


def positions_from_mask(mask_bt: jax.Array, start_b: jax.Array | None = None) -> jax.Array:
    """Return each token's position: `start_b` plus the number of real tokens before it, int32.

    Padded tokens get the position of the next real token, which is harmless because no real token
    attends to them.
    """
    mask_bt = mask_bt.astype(jnp.int32)
    positions_bt = jnp.cumsum(mask_bt, axis=1) - mask_bt
    if start_b is not None:
        positions_bt = positions_bt + start_b[:, None]
    return positions_bt
