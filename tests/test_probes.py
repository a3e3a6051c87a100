"""Probes on hand-built attention matrices and memories, Mamba's implicit attention against a plain
recurrence, and the probes of `experiments.birth` on a hand-set Transformer and a Mamba model."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import birth
from experiments.implicit_attention import implicit_attention, segment_sum
from experiments.probes import (
    associative_memory_recall,
    induction_score,
    previous_token_score,
    split_loss,
)
from models.registry import build_model
from training import load_config_file

REPO = Path(__file__).resolve().parents[1]


def repeated_sequence(batch_size, half_len, vocab_size, seed=0):
    """Return tokens (b, 2 * half_len): distinct random tokens, then the same tokens again."""
    rng = np.random.default_rng(seed)
    half = np.stack([rng.permutation(vocab_size)[:half_len] for _ in range(batch_size)])
    return np.concatenate([half, half], axis=1)


def previous_token_head(batch_size, seq_len):
    attention = np.zeros((batch_size, 1, seq_len, seq_len))
    attention[:, 0, 0, 0] = 1.0
    for t in range(1, seq_len):
        attention[:, 0, t, t - 1] = 1.0
    return attention


def induction_head(tokens):
    """Attend from each repeated token to the position after its earlier occurrence; attend
    uniformly (causally) from first occurrences."""
    batch_size, seq_len = tokens.shape
    attention = np.zeros((batch_size, 1, seq_len, seq_len))
    for b in range(batch_size):
        for t in range(seq_len):
            earlier = [p for p in range(t - 1) if tokens[b, p] == tokens[b, t]]
            if earlier:
                attention[b, 0, t, earlier[-1] + 1] = 1.0
            else:
                attention[b, 0, t, : t + 1] = 1.0 / (t + 1)
    return attention


def uniform_causal_head(batch_size, seq_len):
    weights = np.tril(np.ones((seq_len, seq_len)))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.broadcast_to(weights, (batch_size, 1, seq_len, seq_len)).copy()


def test_previous_token_head_no_induction():
    tokens = repeated_sequence(batch_size=3, half_len=8, vocab_size=16)
    attention = previous_token_head(3, 16)

    assert previous_token_score(attention)[0] == pytest.approx(1.0)
    assert induction_score(attention, tokens)[0] == pytest.approx(0.0)


def test_induction_head_scores_one():
    tokens = repeated_sequence(batch_size=3, half_len=8, vocab_size=16)
    attention = induction_head(tokens)

    assert induction_score(attention, tokens)[0] == pytest.approx(1.0)
    assert previous_token_score(attention)[0] < 0.5


def test_scores_are_per_head():
    tokens = repeated_sequence(batch_size=2, half_len=6, vocab_size=16)
    attention = np.concatenate([previous_token_head(2, 12), induction_head(tokens)], axis=1)

    np.testing.assert_allclose(previous_token_score(attention)[0], 1.0)
    np.testing.assert_allclose(induction_score(attention, tokens), [0.0, 1.0], atol=1e-12)


def test_induction_score_of_uniform_attention():
    half_len = 5
    tokens = repeated_sequence(batch_size=2, half_len=half_len, vocab_size=16)
    attention = uniform_causal_head(2, 2 * half_len)

    # Query t = half_len + i has one earlier occurrence, and weight 1 / (t + 1) on every key.
    expected = np.mean([1.0 / (t + 1) for t in range(half_len, 2 * half_len)])
    assert induction_score(attention, tokens)[0] == pytest.approx(expected)


def test_induction_score_respects_query_mask():
    tokens = np.array([[1, 2, 3, 1, 5, 2]])
    attention = uniform_causal_head(1, 6)
    attention[0, 0, 3] = 0.0
    attention[0, 0, 3, 1] = 1.0  # Query 3 (token 1) puts all weight after the earlier 1.

    only_first_repeat = np.array([[False, False, False, True, False, False]])
    assert induction_score(attention, tokens, only_first_repeat)[0] == pytest.approx(1.0)
    # Query 5 (token 2) follows the earlier 2 at position 1, so its target is position 2.
    assert induction_score(attention, tokens)[0] == pytest.approx((1.0 + 1.0 / 6) / 2)


def test_previous_token_score_respects_query_mask():
    # Query 2 attends to position 1 only, every other query uniformly over its past.
    attention = uniform_causal_head(1, 5)
    attention[0, 0, 2] = 0.0
    attention[0, 0, 2, 1] = 1.0
    after_trigger = np.array([[False, False, True, False, True]])

    # Queries 2 and 4: weights 1 and 1/5 on the previous position.
    assert previous_token_score(attention, after_trigger)[0] == pytest.approx((1.0 + 0.2) / 2)
    # Queries 1..4 without the mask: 1/2, 1, 1/4 and 1/5.
    assert previous_token_score(attention)[0] == pytest.approx((0.5 + 1.0 + 0.25 + 0.2) / 4)
    with pytest.raises(ValueError, match="no query position"):
        previous_token_score(attention, np.array([[True, False, False, False, False]]))


def test_induction_score_skips_repeat_just_before_query():
    # Token 2 at positions 0, 2 and 3. Query 2 looks for position 1 (after the 2 at 0), and so
    # does query 3: the 2 at position 2 is right before it, so the position after it is the query.
    tokens = np.array([[2, 3, 2, 2]])
    attention = uniform_causal_head(1, 4)
    attention[0, 0, 2] = [0.0, 1.0, 0.0, 0.0]
    attention[0, 0, 3] = [0.0, 0.0, 0.0, 1.0]  # All on itself.

    assert induction_score(attention, tokens)[0] == pytest.approx(0.5)


def test_induction_score_rejects_sequences_without_repeats():
    tokens = np.arange(8)[None, :]
    with pytest.raises(ValueError, match="no query position"):
        induction_score(uniform_causal_head(1, 8), tokens)


def test_attention_probes_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 5\)"):
        previous_token_score(np.zeros((2, 1, 4, 5)))
    with pytest.raises(ValueError, match="tokens must have shape"):
        induction_score(uniform_causal_head(2, 4), np.zeros((2, 5), dtype=int))


def orthonormal_rows(num_rows, dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, num_rows)))
    return q.T


def test_outer_product_memory_recalls_all():
    num_inputs, num_outputs, d_in, d_out = 20, 12, 32, 24
    input_embeddings = orthonormal_rows(num_inputs, d_in, seed=0)
    output_embeddings = orthonormal_rows(num_outputs, d_out, seed=1)
    targets = np.random.default_rng(2).integers(0, num_outputs, size=num_inputs)
    pairs = np.stack([np.arange(num_inputs), targets], axis=1)
    memory = sum(np.outer(output_embeddings[j], input_embeddings[i]) for i, j in pairs)

    assert associative_memory_recall(memory, input_embeddings, output_embeddings, pairs) == 1.0
    wrong_pairs = np.stack([pairs[:, 0], (pairs[:, 1] + 1) % num_outputs], axis=1)
    assert associative_memory_recall(memory, input_embeddings, output_embeddings,
                                     wrong_pairs) == 0.0


def test_random_memory_recall_near_chance():
    num_inputs, num_outputs, d_in, d_out = 4000, 50, 64, 48
    rng = np.random.default_rng(3)
    input_embeddings = rng.normal(size=(num_inputs, d_in))
    output_embeddings = rng.normal(size=(num_outputs, d_out))
    pairs = np.stack([np.arange(num_inputs), rng.integers(0, num_outputs, num_inputs)], axis=1)
    memory = rng.normal(size=(d_out, d_in))

    recall = associative_memory_recall(memory, input_embeddings, output_embeddings, pairs)
    # Chance is 1 / 50 = 0.02, with a standard deviation of about 0.0022 over 4000 pairs.
    assert 0.005 < recall < 0.04


def birth_model(variant):
    config = load_config_file(f"{REPO / 'configs' / 'birth_transformer.py'}:{variant}")
    return build_model(config.model, rngs=nnx.Rngs(0)), config.model.vocab_size


def test_memory_recall_transposes_value_output_product():
    # Orthonormal embeddings e_k, and the unembedding u_k of token k equal to e_(k+1). The memory
    # W = sum_k u_k e_k^T maps e_k to u_k (recall 1), and its transpose maps e_k to u_(k-2)
    # (recall 0). The probe reads W_O W_V as (value_kernel @ out_kernel).T, so with an identity
    # value kernel the output kernel is W^T.
    model, vocab_size = birth_model("tiny")
    assert model.blocks[0].attention.config.num_heads == 1
    d_model = model.d_model
    embeddings = orthonormal_rows(vocab_size, d_model, seed=0)
    unembeddings = np.roll(embeddings, -1, axis=0)
    table = np.zeros(model.embedding.embedding.shape, np.float32)
    table[:vocab_size] = embeddings
    model.embedding.embedding[...] = table
    head_kernel = np.zeros(model.head.kernel.shape, np.float32)
    head_kernel[:, :vocab_size] = unembeddings.T
    model.head.kernel[...] = head_kernel
    model.blocks[0].attention_norm.scale[...] = np.ones(d_model, np.float32)
    model.final_norm.scale[...] = np.ones(d_model, np.float32)
    memory = unembeddings.T @ embeddings
    model.blocks[0].attention.value_proj.kernel[...] = np.eye(d_model, dtype=np.float32)

    model.blocks[0].attention.out_proj.kernel[...] = memory.T.astype(np.float32)
    assert birth.head_memory_recall(model, 0, vocab_size) == [1.0]

    model.blocks[0].attention.out_proj.kernel[...] = memory.astype(np.float32)
    assert birth.head_memory_recall(model, 0, vocab_size) == [0.0]


def test_associative_memory_rejects_out_of_range_pairs():
    with pytest.raises(ValueError, match="output indices"):
        associative_memory_recall(np.eye(4), np.eye(4), np.eye(4), np.array([[0, 4]]))
    with pytest.raises(ValueError, match="input_embeddings"):
        associative_memory_recall(np.eye(4), np.eye(3), np.eye(4), np.array([[0, 1]]))


def test_split_loss_means_each_mask():
    loss = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    in_context = np.array([[False, True, False, True], [False, False, False, True]])
    global_bigram = np.array([[True, False, False, False], [True, True, False, False]])

    means = jax.jit(split_loss)(loss, in_context, global_bigram)
    assert float(means["in_context"]) == pytest.approx((2.0 + 4.0 + 8.0) / 3)
    assert float(means["global_bigram"]) == pytest.approx((1.0 + 5.0 + 6.0) / 3)


def test_split_loss_of_empty_mask_is_nan():
    loss = np.ones((1, 3))
    means = split_loss(loss, np.zeros((1, 3), bool), np.ones((1, 3), bool))
    assert np.isnan(float(means["in_context"]))
    assert float(means["global_bigram"]) == pytest.approx(1.0)


def test_segment_sum_sums_each_segment():
    x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    sums = np.asarray(segment_sum(jnp.asarray(x)))
    for b in range(2):
        for i in range(6):
            for j in range(6):
                if i >= j:
                    assert sums[b, i, j] == pytest.approx(x[b, j + 1: i + 1].sum(), abs=1e-5)
                else:
                    assert sums[b, i, j] == -np.inf


def ssm_inputs(batch_size, seq_len, expanded, state, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.log1p(np.exp(rng.normal(size=(batch_size, seq_len, expanded))))  # softplus > 0
    A = -np.exp(rng.normal(size=(expanded, state)))
    B = rng.normal(size=(batch_size, seq_len, state))
    C = rng.normal(size=(batch_size, seq_len, state))
    x = rng.normal(size=(batch_size, seq_len, expanded))
    return dt, A, B, C, x


def test_implicit_attention_reproduces_recurrence():
    batch_size, seq_len, expanded, state = 2, 7, 3, 4
    dt, A, B, C, x = ssm_inputs(batch_size, seq_len, expanded, state)

    # Plain recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, from h = 0.
    y_loop = np.zeros((batch_size, seq_len, expanded))
    for b in range(batch_size):
        for e in range(expanded):
            h = np.zeros(state)
            for t in range(seq_len):
                h = np.exp(dt[b, t, e] * A[e]) * h + dt[b, t, e] * B[b, t] * x[b, t, e]
                y_loop[b, t, e] = C[b, t] @ h

    alpha = np.asarray(implicit_attention(jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B),
                                          jnp.asarray(C)))
    assert alpha.shape == (batch_size, expanded, seq_len, seq_len)
    y_alpha = np.einsum("bets,bse->bte", alpha, x)
    np.testing.assert_allclose(y_alpha, y_loop, rtol=1e-4, atol=1e-4)


def test_implicit_attention_causal_with_diagonal():
    dt, A, B, C, _ = ssm_inputs(1, 5, 2, 3, seed=1)
    alpha = np.asarray(implicit_attention(jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B),
                                          jnp.asarray(C)))

    for t in range(5):
        for s in range(t + 1, 5):
            assert np.all(alpha[:, :, t, s] == 0.0)
        for e in range(2):
            expected = C[0, t] @ B[0, t] * dt[0, t, e]
            assert alpha[0, e, t, t] == pytest.approx(expected, rel=1e-4)


def test_implicit_attention_rejects_mismatched_shapes():
    dt, A, B, C, _ = ssm_inputs(1, 5, 2, 3)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        implicit_attention(dt, A[:, :2], B, C)


def implicit_attention_by_hand(dt, A, B, C):
    """Compute alpha (b, e, t, s) of the selective scan term by term, 0 above the diagonal:

    alpha[b, e, t, s] = dt[b, s, e] sum_n C[b, t, n] B[b, s, n] exp(A[e, n] elapsed), where
    elapsed is the sum of dt[b, r, e] over s < r <= t.
    """
    batch_size, seq_len, expanded = dt.shape
    alpha = np.zeros((batch_size, expanded, seq_len, seq_len))
    for t in range(seq_len):
        for s in range(t + 1):
            elapsed_be = dt[:, s + 1:t + 1].sum(axis=1)
            decay_ben = np.exp(elapsed_be[:, :, None] * A[None])
            alpha[:, :, t, s] = np.einsum("bn,ben,bn->be", C[:, t], decay_ben, B[:, s]) * dt[:, s]
    return alpha


def test_implicit_attention_map_follows_layer_input():
    model, vocab_size = birth_model("mamba,tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab_size, (2, 12)), jnp.int32)
    embeddings = model._embed(tokens)
    second_layer = model.blocks[1]

    def alpha_by_hand(x_btd):
        _, dt, A, B, C = second_layer.mixer.scan_inputs(second_layer.norm(x_btd))
        dt, A, B, C = (np.asarray(array, np.float64) for array in (dt, A, B, C))
        return implicit_attention_by_hand(dt, A, B, C)

    expected = alpha_by_hand(model.blocks[0](embeddings))
    from_embeddings = alpha_by_hand(embeddings)
    alpha = np.asarray(birth.mamba_implicit_attention(model, tokens)[1])

    np.testing.assert_allclose(alpha, expected, rtol=1e-4, atol=1e-6)
    # The first block changes the second layer's map, so a map computed from the embeddings
    # fails the check above.
    assert np.abs(from_embeddings - expected).max() > 0.5 * np.abs(expected).max()
