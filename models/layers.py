"""Layers shared by both architectures."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation with a learned scale (no bias, no mean subtraction).

    Statistics are computed in float32 whatever the input dtype; the output is cast to `dtype`.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # Mean of squares in bfloat16 loses the small components.
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)
