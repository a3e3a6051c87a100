"""Token sampling from logits: greedy, temperature, top-k and top-p (nucleus).

The settings enter the compiled decode loop as arrays, not as static arguments, so changing the
temperature or a cut-off between calls reuses the compiled loop.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits.

    temperature: divides the logits; 0 means greedy (argmax), with no division.
    top_k: sample only from the `top_k` most likely tokens; None keeps the whole vocabulary.
    top_p: sample only from the smallest set of most likely tokens whose probability reaches
        `top_p`. The most likely token is always kept, however small `top_p` is. 1.0 keeps all.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the field if a setting is outside its allowed range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), "
                f"got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise ValueError(
                f"top_k must be between 1 and the vocabulary size {vocab_size}, or None to "
                f"keep every token, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def as_arrays(self, vocab_size: int) -> dict[str, jax.Array]:
        """Return the settings as scalar arrays for `sample_tokens` (top_k None -> vocab_size)."""
        self.validate(vocab_size)
        top_k = vocab_size if self.top_k is None else self.top_k
        return {
            "temperature": jnp.asarray(self.temperature, jnp.float32),
            "top_k": jnp.asarray(top_k, jnp.int32),
            "top_p": jnp.asarray(self.top_p, jnp.float32),
        }


def filter_logits(logits_bv: jax.Array, *, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k tokens or outside the top-p nucleus.

    Ties are broken by token id (lower id first), so exactly min(top_k, nucleus size) tokens stay.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    vocab_size = logits_bv.shape[-1]

    # Rank tokens by descending logit. A stable sort keeps lower ids first among ties.
    order_bv = jnp.argsort(-logits_bv, axis=-1, stable=True)
    sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
    rank_v = jnp.arange(vocab_size)

    # Nucleus: keep a token if the probability of the tokens ranked above it is still below
    # top_p. The top token has nothing above it, so it is always kept.
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_above_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_sorted_bv = (rank_v < top_k) & (mass_above_bv < top_p)
    keep_sorted_bv = keep_sorted_bv.at[:, 0].set(True)

    # Scatter the decisions back from rank order to token order.
    rank_of_token_bv = jnp.argsort(order_bv, axis=-1)
    keep_bv = jnp.take_along_axis(keep_sorted_bv, rank_of_token_bv, axis=-1)
    return jnp.where(keep_bv, logits_bv, -jnp.inf)


def sample_tokens(logits_bv: jax.Array, key: jax.Array, *, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Draw one token id per row of `logits_bv` (b, v); temperature 0 returns the argmax."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = jnp.argmax(logits_bv, axis=-1)

    # Divide by 1 when greedy so that no inf or NaN is formed; the greedy branch is chosen below.
    is_greedy = temperature <= 0
    scaled_bv = logits_bv / jnp.where(is_greedy, 1.0, temperature)
    filtered_bv = filter_logits(scaled_bv, top_k=top_k, top_p=top_p)
    sampled_b = jax.random.categorical(key, filtered_bv, axis=-1)

    return jnp.where(is_greedy, greedy_b, sampled_b).astype(jnp.int32)
