"""The implicit attention matrix of a Mamba selective scan (Ali et al. 2024, "The Hidden Attention
of Mamba Models").

Unrolling the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t from h_0 = 0
gives y_t = sum_{s <= t} alpha[t, s] x_s per channel e, with

  alpha[b, e, t, s] = sum_n C[b, t, n] exp(sum_{s < r <= t} dt[b, r, e] A[e, n]) dt[b, s, e] B[b, s, n]

for s <= t and 0 above the diagonal. The D skip (D x_t) and the SiLU(z) gate sit outside the scan
and are not part of alpha.
"""

import jax
import jax.numpy as jnp


def segment_sum(x_t: jax.Array) -> jax.Array:
    """Return S (..., t, t) with S[i, j] = x[j + 1] + ... + x[i] for i >= j and -inf for i < j.

    Each entry is summed directly over its segment. A difference of two prefix sums would lose
    float32 precision once the prefix sums grow large compared with the segment's own sum.
    """
    seq_len = x_t.shape[-1]
    repeated_ij = jnp.broadcast_to(x_t[..., :, None], x_t.shape + (seq_len,))
    below = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool), k=-1)
    sums_ij = jnp.cumsum(jnp.where(below, repeated_ij, 0.0), axis=-2)
    on_or_below = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    return jnp.where(on_or_below, sums_ij, -jnp.inf)


def implicit_attention(dt_bte: jax.Array, A_en: jax.Array, B_btn: jax.Array,
                       C_btn: jax.Array) -> jax.Array:
    """Compute alpha (b, e, t, s) in float32: the weights with which y_t mixes inputs x_s.

    `dt` is the step size after softplus (positive) and `A` = -exp(A_log) (negative). The cost is
    O(b * e * n * t^2) memory, meant for inspecting short sequences, not for long ones.
    """
    if dt_bte.ndim != 3 or A_en.ndim != 2 or B_btn.ndim != 3 or C_btn.shape != B_btn.shape:
        raise ValueError("implicit_attention expects dt (b, t, e), A (e, n), B (b, t, n) and "
                         f"C (b, t, n), got dt {dt_bte.shape}, A {A_en.shape}, B {B_btn.shape}, "
                         f"C {C_btn.shape}")
    if dt_bte.shape[:2] != B_btn.shape[:2] or A_en.shape != (dt_bte.shape[2], B_btn.shape[2]):
        raise ValueError(f"inconsistent shapes: dt {dt_bte.shape}, A {A_en.shape}, "
                         f"B {B_btn.shape}: A must be (e, n) with e from dt and n from B")

    # The decay exp(dt * A) runs in float32, because in bfloat16 its products over many steps
    # lose precision.
    dt_bte = dt_bte.astype(jnp.float32)
    A_en = A_en.astype(jnp.float32)
    B_btn = B_btn.astype(jnp.float32)
    C_btn = C_btn.astype(jnp.float32)

    log_decay_bent = jnp.einsum("bte,en->bent", dt_bte, A_en)
    decay_bents = jnp.exp(segment_sum(log_decay_bent))
    return jnp.einsum("btn,bents,bsn,bse->bets", C_btn, decay_bents, B_btn, dt_bte)
