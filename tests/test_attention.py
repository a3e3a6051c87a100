"""Causal attention: config checks, positions, grouped-query heads, causality, key/value cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import CausalSelfAttention, TransformerConfig, build_language_model
from attention.positions import apply_rope, positions_from_mask, sinusoidal_encoding

TINY = dict(vocab_size=32, d_model=32, num_layers=2, num_heads=4, ffn_dim=64)

# Transformer++ with grouped-query attention and RoPE, and the classic block with sinusoidal
# positions: every cache and padding test runs on both position schemes.
MODEL_CONFIGS = {
    "transformer++": TransformerConfig(**TINY, num_kv_heads=2),
    "classic": TransformerConfig(**TINY, flavour="classic", max_len=64),
}


@nnx.jit
def forward(model, tokens, mask=None):
    return model(tokens, mask=mask)


@nnx.jit
def prefill(model, tokens, cache, mask=None):
    return model.prefill(tokens, cache, mask=mask)


@nnx.jit
def step(model, token, cache):
    return model.step(token, cache)


@pytest.fixture(scope="module", params=sorted(MODEL_CONFIGS))
def model(request):
    return build_language_model(MODEL_CONFIGS[request.param], rngs=nnx.Rngs(0))


def random_tokens(seed, shape, vocab_size=32):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab_size)


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=5), "num_heads"),  # 5 does not divide d_model = 32.
    (dict(num_kv_heads=3), "num_kv_heads"),  # 3 does not divide num_heads = 4.
    (dict(d_model=30, num_heads=2, head_dim=15), "head_dim"),  # Odd head_dim with RoPE.
    (dict(flavour="gpt"), "flavour"),
    (dict(positions="alibi"), "positions"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_model=-4), "d_model"),
    (dict(num_layers=0), "num_layers"),
    (dict(ffn_dim=0), "ffn_dim"),
    (dict(max_len=0), "max_len"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_config_rejects_invalid_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TransformerConfig(**{**TINY, **overrides})


def test_config_defaults_follow_flavour():
    plus = TransformerConfig(**{**TINY, "ffn_dim": None})
    classic = TransformerConfig(**{**TINY, "ffn_dim": None}, flavour="classic")

    assert plus.positions == "rope"
    assert plus.num_kv_heads == 4
    assert plus.head_dim == 8
    assert plus.attention_bias is False
    assert plus.ffn_dim == 88  # 8/3 * 32 = 85.3, rounded up to a multiple of 8.
    assert classic.positions == "sinusoidal"
    assert classic.attention_bias is True
    assert classic.ffn_dim == 128


def test_config_allows_odd_head_dim_without_rope():
    config = TransformerConfig(**{**TINY, "d_model": 30, "num_heads": 2}, positions="none")
    assert config.head_dim == 15


# --- positions -----------------------------------------------------------------------------


def test_sinusoidal_encoding_matches_formula():
    # d = 8: channel pair i has angle pos / 10000^(2i/8), so frequencies 1, 0.1, 0.01, 0.001.
    encoding = np.asarray(sinusoidal_encoding(jnp.array([[0, 1, 7]]), 8))[0]

    np.testing.assert_allclose(encoding[0], [0, 1, 0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(encoding[1, :4], [0.84147098, 0.54030231, 0.09983342, 0.99500417],
                               atol=1e-6)
    np.testing.assert_allclose(encoding[2, :4], [0.65698660, 0.75390225, 0.64421769, 0.76484219],
                               atol=1e-6)
    np.testing.assert_allclose(encoding[2, 4], math.sin(0.07), atol=1e-6)
    np.testing.assert_allclose(encoding[2, 7], math.cos(0.007), atol=1e-6)


def test_rope_rotates_channel_pairs_by_position():
    # Channels i and i + k/2 form the complex number x_i + j x_{i+k/2}, turned by pos * freq_i.
    head_dim, base, position = 8, 100.0, 3
    x = np.asarray(random_tokens(1, (head_dim,), 10), np.float32) - 4.5
    rotated = np.asarray(apply_rope(jnp.asarray(x)[None, None, None], jnp.array([[position]]),
                                    base=base))[0, 0, 0]

    half = head_dim // 2
    frequencies = base ** (-2.0 * np.arange(half) / head_dim)
    expected = (x[:half] + 1j * x[half:]) * np.exp(1j * position * frequencies)
    np.testing.assert_allclose(rotated[:half], expected.real, atol=1e-5)
    np.testing.assert_allclose(rotated[half:], expected.imag, atol=1e-5)


def test_rope_scores_depend_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(query_position, key_position):
        q_rotated = apply_rope(q, jnp.array([[query_position]]), base=10000.0)
        k_rotated = apply_rope(k, jnp.array([[key_position]]), base=10000.0)
        return float(jnp.sum(q_rotated * k_rotated))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_positions_from_mask_count_real_tokens_before():
    mask = jnp.array([[False, False, True, True, True], [True, True, True, True, True]])

    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(positions_from_mask(mask, jnp.array([3, 5])),
                                  [[3, 3, 3, 4, 5], [5, 6, 7, 8, 9]])


def test_sinusoidal_padded_prompt_starts_at_zero():
    # With the attention and feed-forward outputs zeroed, every block passes its input through,
    # so the logits are the tied head of LayerNorm(embedding + encoding / sqrt(d_model)).
    model = build_language_model(MODEL_CONFIGS["classic"], rngs=nnx.Rngs(0))
    for block in model.blocks:
        for projection in (block.attention.out_proj, block.feed_forward.down_proj):
            projection.kernel[...] = jnp.zeros_like(projection.kernel[...])
            projection.bias[...] = jnp.zeros_like(projection.bias[...])
    tokens = jnp.array([[31, 31, 4, 9, 17]])
    mask = jnp.array([[False, False, True, True, True]])

    logits = np.asarray(forward(model, tokens, mask))[0, 2:]

    # Channel 2i is sin(p / 10000^(2i/32)) and channel 2i + 1 its cos, for positions p = 0, 1, 2.
    angles = np.arange(3)[:, None] / 10000.0 ** (np.arange(0, 32, 2) / 32)
    encoding = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(3, 32)
    table = np.asarray(model.embedding.embedding[...], np.float64)
    x = table[[4, 9, 17]] + encoding / np.sqrt(32)
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(logits, normed @ table.T, atol=1e-5)


# --- attention -----------------------------------------------------------------------------


def reference_attention(module, x_btd):
    """Plain multi-head causal attention written with einsum, no positions."""
    heads, head_dim = module.config.num_heads, module.config.head_dim
    b, t, _ = x_btd.shape

    def project(linear):
        return jnp.einsum("btd,de->bte", x_btd, linear.kernel[...]).reshape(b, t, heads, head_dim)

    q, k, v = project(module.query_proj), project(module.key_proj), project(module.value_proj)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(head_dim)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, -1), v)
    return out.reshape(b, t, heads * head_dim) @ module.out_proj.kernel[...]


def test_attention_with_equal_heads_matches_plain_einsum():
    config = TransformerConfig(**TINY, num_kv_heads=4, positions="none")
    module = CausalSelfAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 7, 32))

    np.testing.assert_allclose(module(x), reference_attention(module, x), atol=1e-5)


def test_grouped_query_attention_shares_key_value_heads():
    # Two key/value heads for four query heads equal four heads whose key/value weights are
    # copies: query heads 0 and 1 use key/value head 0, heads 2 and 3 use head 1.
    grouped_config = TransformerConfig(**TINY, num_kv_heads=2, positions="none")
    grouped = CausalSelfAttention(grouped_config, rngs=nnx.Rngs(0))
    full = CausalSelfAttention(TransformerConfig(**TINY, positions="none"), rngs=nnx.Rngs(1))

    full.query_proj.kernel[...] = grouped.query_proj.kernel[...]
    full.out_proj.kernel[...] = grouped.out_proj.kernel[...]
    for name in ("key_proj", "value_proj"):
        kernel_dgk = getattr(grouped, name).kernel[...].reshape(32, 2, 8)
        getattr(full, name).kernel[...] = jnp.repeat(kernel_dgk, 2, axis=1).reshape(32, 32)

    x = jax.random.normal(jax.random.key(3), (2, 6, 32))
    np.testing.assert_allclose(grouped(x), reference_attention(full, x), atol=1e-5)


def test_attention_rejects_mask_of_wrong_shape():
    module = CausalSelfAttention(TransformerConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask must have shape"):
        module(jnp.zeros((2, 5, 32)), mask=jnp.ones((2, 4), bool))


def test_changing_token_leaves_earlier_outputs_unchanged(model):
    tokens = random_tokens(4, (2, 10))
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 32)

    logits, changed_logits = forward(model, tokens), forward(model, changed)

    np.testing.assert_array_equal(logits[:, :6], changed_logits[:, :6])
    assert np.abs(np.asarray(logits[:, 6:] - changed_logits[:, 6:])).min(axis=-1).max() > 0


# --- key/value cache -----------------------------------------------------------------------


def decode_teacher_forced(model, tokens, prompt_len, max_len=16):
    """Prefill tokens[:, :prompt_len], then step through the rest, returning logits (b, t, v)."""
    cache = model.init_cache(tokens.shape[0], max_len)
    logits, cache = prefill(model, tokens[:, :prompt_len], cache)
    all_logits = [logits]
    for i in range(prompt_len, tokens.shape[1]):
        step_logits, cache = step(model, tokens[:, i], cache)
        all_logits.append(step_logits[:, None])
    return jnp.concatenate(all_logits, axis=1)


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cached_decoding_matches_full_forward(model, prompt_len):
    tokens = random_tokens(5, (2, 10))

    cached = decode_teacher_forced(model, tokens, prompt_len)

    np.testing.assert_allclose(cached, forward(model, tokens), atol=1e-5)


def test_prefill_in_two_chunks_matches_one_chunk(model):
    tokens = random_tokens(6, (2, 9))
    cache = model.init_cache(2, 12)
    first_logits, cache = prefill(model, tokens[:, :4], cache)
    second_logits, cache = prefill(model, tokens[:, 4:], cache)

    chunked = jnp.concatenate([first_logits, second_logits], axis=1)
    np.testing.assert_allclose(chunked, forward(model, tokens), atol=1e-5)
    assert int(cache[0].index) == 9


def test_left_padded_prompt_matches_prompt_alone(model):
    # Row 0 is the prompt after 3 padding tokens, and row 1 another prompt with no padding.
    prompt = random_tokens(7, (1, 5))
    other = random_tokens(8, (1, 8))
    padded = jnp.concatenate([jnp.full((1, 3), 31), prompt], axis=1)
    batch = jnp.concatenate([padded, other])
    mask = jnp.array([[False] * 3 + [True] * 5, [True] * 8])
    continuation = random_tokens(9, (2, 3))

    cache = model.init_cache(2, 12)
    padded_logits, cache = prefill(model, batch, cache, mask)
    full_logits = forward(model, batch, mask)
    # The prompt alone, twice, so that its decode steps reuse the compiled batch-2 step.
    alone_cache = model.init_cache(2, 12)
    alone_logits, alone_cache = prefill(model, jnp.concatenate([prompt, prompt]), alone_cache)

    np.testing.assert_allclose(padded_logits[0, 3:], alone_logits[0], atol=1e-5)
    np.testing.assert_allclose(full_logits[0, 3:], alone_logits[0], atol=1e-5)
    np.testing.assert_allclose(padded_logits[1], full_logits[1], atol=1e-5)
    for i in range(3):
        step_logits, cache = step(model, continuation[:, i], cache)
        alone_step_logits, alone_cache = step(model, continuation[:, i], alone_cache)
        np.testing.assert_allclose(step_logits[0], alone_step_logits[0], atol=1e-5)


def test_cache_keeps_positions_and_key_mask(model):
    mask = jnp.array([[False, False, True, True], [True, True, True, True]])
    cache = model.init_cache(2, 8)
    _, cache = prefill(model, random_tokens(10, (2, 4)), cache, mask)

    for layer_cache in cache:
        np.testing.assert_array_equal(layer_cache.positions, [2, 4])
        np.testing.assert_array_equal(layer_cache.key_mask[:, :4], mask)
        assert not layer_cache.key_mask[:, 4:].any()


def test_cache_index_moves_one_per_token(model):
    cache = model.init_cache(2, 8)
    assert int(cache[0].index) == 0

    _, cache = prefill(model, random_tokens(11, (2, 3)), cache)
    assert [int(layer_cache.index) for layer_cache in cache] == [3, 3]
    for expected in range(4, 9):
        _, cache = step(model, random_tokens(expected, (2,)), cache)
        assert [int(layer_cache.index) for layer_cache in cache] == [expected, expected]
        np.testing.assert_array_equal(cache[0].positions, [expected, expected])


def test_step_past_cache_end_raises(model):
    cache = model.init_cache(1, 4)
    _, cache = prefill(model, random_tokens(12, (1, 4)), cache)

    with pytest.raises(ValueError, match="cache is full"):
        model.step(jnp.array([1]), cache)


def test_prefill_past_cache_end_raises(model):
    cache = model.init_cache(1, 4)
    _, cache = prefill(model, random_tokens(12, (1, 3)), cache)

    with pytest.raises(ValueError, match="cache is full"):
        model.prefill(jnp.array([[1, 2]]), cache)


def test_prefill_longer_than_cache_raises(model):
    with pytest.raises(ValueError, match="does not fit"):
        prefill(model, random_tokens(13, (1, 5)), model.init_cache(1, 4))


def test_jitted_step_past_cache_end_returns_nan(model):
    # Under jit the slot index is traced and cannot raise; the overflowing token's logits are NaN.
    cache = model.init_cache(1, 4)
    logits, cache = prefill(model, random_tokens(14, (1, 4)), cache)
    assert np.isfinite(logits).all()

    logits, _ = step(model, jnp.array([1]), cache)

    assert np.isnan(logits).all()


def test_init_cache_rejects_non_positive_sizes(model):
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 0)
    with pytest.raises(ValueError, match="batch_size"):
        model.init_cache(0, 4)
