"""Probes of trained models: attention patterns, associative memories and split losses.

Attention probes take one layer's attention weights `attention_bhts` (b, h, t, s) with t == s,
rows summing to 1 over s (causal softmax weights), and return one score per head (h,). For
several layers, call them once per layer.
"""

import jax.numpy as jnp
import numpy as np


def _check_attention(attention_bhts: np.ndarray) -> np.ndarray:
    attention_bhts = np.asarray(attention_bhts)
    if attention_bhts.ndim != 4 or attention_bhts.shape[2] != attention_bhts.shape[3]:
        raise ValueError("attention weights must have shape (batch, heads, t, t) with equal "
                         f"query and key lengths, got shape {attention_bhts.shape}")
    return attention_bhts


def previous_token_score(attention_bhts: np.ndarray,
                         query_mask_bt: np.ndarray | None = None) -> np.ndarray:
    """Return per head the mean attention A[t, t - 1] over the batch and positions t >= 1.

    With `query_mask_bt` (b, t), only the positions t where it is True count (for example, the
    positions right after a trigger). A head that always attends to the previous token scores 1.0.
    """
    attention_bhts = _check_attention(attention_bhts)
    batch_size, _, seq_len, _ = attention_bhts.shape
    if seq_len < 2:
        raise ValueError(f"previous_token_score needs sequences of length >= 2, got {seq_len}")
    positions = np.arange(1, seq_len)
    previous_bht = attention_bhts[:, :, positions, positions - 1]
    if query_mask_bt is None:
        return previous_bht.mean(axis=(0, 2))
    query_mask_bt = np.asarray(query_mask_bt, dtype=bool)
    if query_mask_bt.shape != (batch_size, seq_len):
        raise ValueError(f"query_mask must have shape {(batch_size, seq_len)}, "
                         f"got {query_mask_bt.shape}")
    queries_bt = query_mask_bt[:, 1:]
    if not queries_bt.any():
        raise ValueError("previous_token_score found no query position t >= 1 in query_mask")
    return np.einsum("bht,bt->h", previous_bht, queries_bt.astype(previous_bht.dtype)) / (
        queries_bt.sum())


def induction_score(attention_bhts: np.ndarray, tokens_bt: np.ndarray,
                    query_mask_bt: np.ndarray | None = None) -> np.ndarray:
    """Return per head the mean attention from a repeated token to the tokens that followed it.

    For a query position t whose token occurred before at positions p <= t - 2, the query's score
    is the sum of A[t, p + 1] over all those p. These are the positions right after earlier
    occurrences, which hold the token an induction head should copy. Occurrences at
    p = t - 1 are skipped because p + 1 would be t itself. The score is averaged over the query
    positions that have at least one such p, restricted to `query_mask_bt` (b, t) when given
    (for example, to trigger tokens only). A head that puts all its weight on those positions
    scores 1.0.

    NOTE: When the same token sits at t - 2 and t, the position after the earlier occurrence is
    t - 1, so a previous-token head gets credit at that query. On random tokens over a vocabulary
    of size V, that happens at about 1 / V of the queries.
    """
    attention_bhts = _check_attention(attention_bhts)
    tokens_bt = np.asarray(tokens_bt)
    batch_size, _, seq_len, _ = attention_bhts.shape
    if tokens_bt.shape != (batch_size, seq_len):
        raise ValueError(f"tokens must have shape {(batch_size, seq_len)} to match the attention "
                         f"weights, got {tokens_bt.shape}")

    # earlier_btp[b, t, p]: token p equals token t and p <= t - 2.
    strictly_before = np.tril(np.ones((seq_len, seq_len), dtype=bool), k=-2)
    earlier_btp = (tokens_bt[:, :, None] == tokens_bt[:, None, :]) & strictly_before
    # follows_bts[b, t, s]: position s comes right after an earlier occurrence of token t.
    follows_bts = np.zeros_like(earlier_btp)
    follows_bts[:, :, 1:] = earlier_btp[:, :, :-1]

    queries_bt = follows_bts.any(axis=2)
    if query_mask_bt is not None:
        query_mask_bt = np.asarray(query_mask_bt, dtype=bool)
        if query_mask_bt.shape != (batch_size, seq_len):
            raise ValueError(f"query_mask must have shape {(batch_size, seq_len)}, "
                             f"got {query_mask_bt.shape}")
        queries_bt &= query_mask_bt
    num_queries = queries_bt.sum()
    if num_queries == 0:
        raise ValueError("induction_score found no query position whose token occurred at least "
                         "two positions earlier; pass sequences with repeated tokens")

    mass_bht = np.einsum("bhts,bts->bht", attention_bhts, follows_bts.astype(attention_bhts.dtype))
    return np.einsum("bht,bt->h", mass_bht, queries_bt.astype(mass_bht.dtype)) / num_queries


def associative_memory_recall(matrix: np.ndarray, input_embeddings: np.ndarray,
                              output_embeddings: np.ndarray, pairs: np.ndarray) -> float:
    """Return the fraction of pairs (i, j) with argmax_k u_k^T W e_i == j.

    This is the memory recall probe of Bietti et al. 2023, "Birth of a Transformer: A Memory
    Viewpoint": a weight matrix W stores the association i -> j when, read through the output
    embeddings, W e_i scores j highest among all candidates k. For the second layer's W_O W_V in
    the induction head, the pairs are (k, k) for every token k, because that head copies the
    attended token to the output.

    Args:
      matrix: W (d_out, d_in), acting on column vectors: W e_i has shape (d_out,). A Flax
        `nnx.Linear` kernel (d_in, d_out) computes x @ kernel, so pass its transpose. For a head's
        output-value product, W = (value_kernel @ output_kernel).T.
      input_embeddings: rows e_i, shape (num_inputs, d_in).
      output_embeddings: rows u_k, shape (num_outputs, d_out). The argmax runs over all rows.
      pairs: int array (m, 2) of (i, j), i indexing input_embeddings and j output_embeddings.
    """
    matrix = np.asarray(matrix)
    input_embeddings = np.asarray(input_embeddings)
    output_embeddings = np.asarray(output_embeddings)
    pairs = np.asarray(pairs)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D (d_out, d_in), got shape {matrix.shape}")
    d_out, d_in = matrix.shape
    if input_embeddings.ndim != 2 or input_embeddings.shape[1] != d_in:
        raise ValueError(f"input_embeddings must have shape (num_inputs, {d_in}), "
                         f"got {input_embeddings.shape}")
    if output_embeddings.ndim != 2 or output_embeddings.shape[1] != d_out:
        raise ValueError(f"output_embeddings must have shape (num_outputs, {d_out}), "
                         f"got {output_embeddings.shape}")
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs must have shape (m, 2) with m >= 1, got {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"pairs must hold integer indices, got dtype {pairs.dtype}")
    inputs, outputs = pairs[:, 0], pairs[:, 1]
    if inputs.min() < 0 or inputs.max() >= input_embeddings.shape[0]:
        raise ValueError(f"input indices in pairs must be in [0, {input_embeddings.shape[0] - 1}]"
                         f", got range [{inputs.min()}, {inputs.max()}]")
    if outputs.min() < 0 or outputs.max() >= output_embeddings.shape[0]:
        raise ValueError(f"output indices in pairs must be in "
                         f"[0, {output_embeddings.shape[0] - 1}], "
                         f"got range [{outputs.min()}, {outputs.max()}]")

    scores_mk = input_embeddings[inputs] @ matrix.T @ output_embeddings.T
    return float(np.mean(scores_mk.argmax(axis=1) == outputs))


def split_loss(loss_bt, in_context_mask_bt, global_bigram_mask_bt) -> dict:
    """Return the mean per-token loss over in-context positions and over global-bigram positions.

    Works on numpy or JAX arrays, also under `jax.jit`. A mean over an empty mask is NaN.
    """
    loss_bt = jnp.asarray(loss_bt, dtype=jnp.float32)
    means = {}
    for name, mask_bt in (("in_context", in_context_mask_bt),
                          ("global_bigram", global_bigram_mask_bt)):
        mask_bt = jnp.asarray(mask_bt, dtype=bool)
        if mask_bt.shape != loss_bt.shape:
            raise ValueError(f"{name} mask must have the loss shape {loss_bt.shape}, "
                             f"got {mask_bt.shape}")
        total = jnp.sum(jnp.where(mask_bt, loss_bt, 0.0))
        means[name] = total / jnp.sum(mask_bt)
    return means
