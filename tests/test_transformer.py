"""Transformer blocks and language model: training, attention weights, parameters, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax import nnx

from attention import TransformerConfig, attention_weights, build_language_model
from attention.transformer import GeluMLP, TransformerBlock, make_norm
from models import LanguageModel

jitted_attention_weights = nnx.jit(attention_weights)


@nnx.jit
def forward(model, tokens):
    return model(tokens)

TINY = dict(vocab_size=16, d_model=32, num_layers=2, num_heads=4, ffn_dim=64)
COPY_LENGTH = 8


def copy_batch(key, batch_size=32):
    """Return sequences x x of random tokens x (COPY_LENGTH each), shape (b, 2 * COPY_LENGTH)."""
    first_half = jax.random.randint(key, (batch_size, COPY_LENGTH), 0, TINY["vocab_size"])
    return jnp.concatenate([first_half, first_half], axis=1)


def train_copying(config, steps):
    """Train on the copying task with Adam; return the losses of the first and last 20 steps."""
    model = build_language_model(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(3e-3)
    optimizer_state = optimizer.init(params)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        # Only the second half is predictable: it repeats the first half.
        log_probs = jax.nn.log_softmax(logits[:, COPY_LENGTH - 1:], axis=-1)
        targets = tokens[:, COPY_LENGTH:, None]
        return -jnp.mean(jnp.take_along_axis(log_probs, targets, axis=-1))

    @jax.jit
    def train_step(params, optimizer_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, copy_batch(key))
        updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
        return optax.apply_updates(params, updates), optimizer_state, loss

    losses = []
    for key in jax.random.split(jax.random.key(1), steps):
        params, optimizer_state, loss = train_step(params, optimizer_state, key)
        losses.append(float(loss))
    return np.mean(losses[:20]), np.mean(losses[-20:])


@pytest.mark.parametrize("flavour", ["transformer++", "classic"])
def test_block_flavour_learns_copying(flavour):
    first_loss, last_loss = train_copying(TransformerConfig(**TINY, flavour=flavour), steps=300)

    assert first_loss > 0.9 * np.log(TINY["vocab_size"])  # Starts near chance.
    assert last_loss < 0.5 * first_loss


@pytest.fixture(scope="module")
def model():
    return build_language_model(TransformerConfig(**TINY, num_kv_heads=2), rngs=nnx.Rngs(0))


def test_language_model_uses_shared_class(model):
    assert isinstance(model, LanguageModel)
    assert model.num_layers == 2
    assert forward(model, jnp.zeros((2, 5), jnp.int32)).shape == (2, 5, 16)


def test_attention_weights_are_causal_distributions(model):
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 16)

    weights = jitted_attention_weights(model, tokens)

    assert len(weights) == 2
    for layer_weights in weights:
        assert layer_weights.shape == (2, 4, 6, 6)
        np.testing.assert_allclose(layer_weights.sum(axis=-1), 1.0, atol=1e-6)
        upper = np.triu(np.ones((6, 6), bool), k=1)
        assert (np.asarray(layer_weights)[..., upper] == 0).all()


def test_attention_weights_ignore_padded_keys(model):
    tokens = jax.random.randint(jax.random.key(0), (1, 6), 0, 16)
    mask = jnp.array([[False, False, True, True, True, True]])

    weights = jitted_attention_weights(model, tokens, mask=mask)

    for layer_weights in weights:
        assert (np.asarray(layer_weights)[0, :, 2:, :2] == 0).all()


def test_attention_weights_reproduce_layer_output(model):
    # Mixing the values of layer 0 with the returned weights gives that layer's attention output.
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 16)
    block = model.blocks[0]
    x = model.embedding(tokens).astype(jnp.float32)
    normed = block.attention_norm(x)
    values = block.attention.value_proj(normed).reshape(2, 6, 2, 8)
    values = jnp.repeat(values, 2, axis=2)

    weights = jitted_attention_weights(model, tokens)[0]
    mixed = jnp.einsum("bhts,bshk->bthk", weights, values).reshape(2, 6, 32)

    np.testing.assert_allclose(block.attention.out_proj(mixed), block.attention(normed),
                               atol=1e-5)


def test_parameter_names_follow_weight_decay_convention():
    # The optimizer decays matrices named `kernel` and exempts `bias`, `scale` and `embedding`.
    # Per block, Transformer++: 2 norm scales, 4 attention and 3 feed-forward kernels (9).
    # Classic: 2 norms with scale and bias, 4 attention and 2 feed-forward kernels with biases
    # (16). Both add an embedding, a head and a final norm (1 or 2 parameters).
    expected_counts = {"transformer++": 2 + 2 * 9 + 1, "classic": 2 + 2 * 16 + 2}
    for flavour, expected_count in expected_counts.items():
        config = TransformerConfig(**TINY, flavour=flavour, tie_embeddings=False)
        model = build_language_model(config, rngs=nnx.Rngs(0))
        params = [(path, node) for path, node in nnx.iter_graph(model)
                  if isinstance(node, nnx.Param)]
        assert len(params) == expected_count
        for path, param in params:
            name = path[-1]
            assert name in ("kernel", "bias", "scale", "embedding"), path
            assert (param.ndim == 2) == (name in ("kernel", "embedding")), path


def test_flavours_have_expected_biases():
    plus = build_language_model(TransformerConfig(**TINY), rngs=nnx.Rngs(0))
    classic = build_language_model(TransformerConfig(**TINY, flavour="classic"),
                                   rngs=nnx.Rngs(0))

    assert plus.blocks[0].attention.query_proj.bias is None
    assert plus.blocks[0].feed_forward.down_proj.bias is None
    assert classic.blocks[0].attention.query_proj.bias is not None
    assert classic.blocks[0].feed_forward.down_proj.bias is not None
    assert classic.blocks[0].attention_norm.bias is not None


def test_classic_feed_forward_applies_tanh_gelu():
    feed_forward = GeluMLP(TransformerConfig(**TINY, flavour="classic"), rngs=nnx.Rngs(0))
    # Weights of unit scale spread the hidden units u up to |u| of about 9. There the tanh and
    # the erf form of GELU differ by up to 5e-4, well above float32 rounding.
    rng = np.random.default_rng(0)
    up_kernel = (rng.normal(size=(32, 64)) / np.sqrt(32)).astype(np.float32)
    up_bias = rng.normal(size=64).astype(np.float32)
    down_kernel = (rng.normal(size=(64, 32)) / np.sqrt(64)).astype(np.float32)
    down_bias = rng.normal(size=32).astype(np.float32)
    feed_forward.up_proj.kernel[...] = jnp.asarray(up_kernel)
    feed_forward.up_proj.bias[...] = jnp.asarray(up_bias)
    feed_forward.down_proj.kernel[...] = jnp.asarray(down_kernel)
    feed_forward.down_proj.bias[...] = jnp.asarray(down_bias)
    x = rng.normal(scale=2.0, size=(2, 5, 32)).astype(np.float32)

    # The hand computation runs in float64, on the same float32 values.
    hidden = x.astype(np.float64) @ up_kernel + up_bias
    tanh_gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
    erf_gelu = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))
    output = np.asarray(feed_forward(jnp.asarray(x)), np.float64)

    np.testing.assert_allclose(output, tanh_gelu @ down_kernel + down_bias, rtol=1e-5, atol=1e-5)
    assert np.abs(output - (erf_gelu @ down_kernel + down_bias)).max() > 1e-4
    assert np.abs(output - (hidden @ down_kernel + down_bias)).max() > 1e-1


def test_sinusoidal_positions_are_added_once():
    # With the attention and feed-forward outputs of all 3 blocks zeroed, the blocks pass the
    # residual stream through, so the logits are the tied head of LayerNorm(embedding + one
    # encoding / sqrt(d_model)).
    config = TransformerConfig(**{**TINY, "num_layers": 3}, flavour="classic")
    model = build_language_model(config, rngs=nnx.Rngs(0))
    for block in model.blocks:
        for projection in (block.attention.out_proj, block.feed_forward.down_proj):
            projection.kernel[...] = jnp.zeros_like(projection.kernel[...])
            projection.bias[...] = jnp.zeros_like(projection.bias[...])
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])

    logits = np.asarray(forward(model, tokens))[0]

    # Channel 2i is sin(p / 10000^(2i/32)) and channel 2i + 1 its cos.
    angles = np.arange(6)[:, None] / 10000.0 ** (np.arange(0, 32, 2) / 32)
    encoding = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(6, 32)
    table = np.asarray(model.embedding.embedding[...], np.float64)
    x = table[[3, 1, 4, 1, 5, 9]] + encoding / np.sqrt(32)
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(logits, normed @ table.T, atol=1e-5)


@pytest.mark.parametrize("flavour", ["transformer++", "classic"])
def test_residual_output_projections_scale_with_depth(flavour):
    # GPT-2 initialisation: std 0.02 / sqrt(2 * num_layers) = 0.005 for 8 layers. Sample stds
    # of 4096 (attention) and 8192 (feed-forward) draws are within about 1% of the std.
    config = TransformerConfig(vocab_size=16, d_model=64, num_layers=8, num_heads=4,
                               ffn_dim=128, flavour=flavour)
    model = build_language_model(config, rngs=nnx.Rngs(0))

    for index, block in enumerate(model.blocks):
        attention_std = float(np.std(block.attention.out_proj.kernel[...]))
        feed_forward_std = float(np.std(block.feed_forward.down_proj.kernel[...]))
        assert attention_std == pytest.approx(0.005, rel=0.1), f"layer {index}"
        assert feed_forward_std == pytest.approx(0.005, rel=0.1), f"layer {index}"


@pytest.mark.parametrize("init_std", [None, 0.05], ids=["default", "0.05"])
def test_embedding_and_untied_head_use_init_std(init_std):
    config = TransformerConfig(vocab_size=256, d_model=64, num_layers=1, num_heads=4,
                               ffn_dim=128)
    rngs = nnx.Rngs(0)
    std_argument = {} if init_std is None else {"embedding_init_std": init_std}
    model = LanguageModel(
        vocab_size=256, d_model=64, blocks=[TransformerBlock(config, layer_index=0, rngs=rngs)],
        final_norm=make_norm(config, rngs=rngs), tie_embeddings=False, rngs=rngs,
        **std_argument)
    expected_std = 0.02 if init_std is None else init_std

    # 256 * 64 draws each: the sample std is within about 1% of the std.
    assert float(np.std(model.embedding.embedding[...])) == pytest.approx(expected_std, rel=0.1)
    assert float(np.std(model.head.kernel[...])) == pytest.approx(expected_std, rel=0.1)


def test_bfloat16_compute_keeps_float32_parameters():
    config = TransformerConfig(**TINY, dtype=jnp.bfloat16)
    model = build_language_model(config, rngs=nnx.Rngs(0))

    logits = forward(model, jnp.zeros((1, 4), jnp.int32))

    assert logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    assert model.blocks[0].attention.query_proj.kernel.dtype == jnp.float32
    assert model.init_cache(1, 4)[0].key.dtype == jnp.bfloat16


def test_sinusoidal_model_rejects_length_past_max_len():
    config = TransformerConfig(**TINY, flavour="classic", max_len=8)
    model = build_language_model(config, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 9)
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, 9), jnp.int32))
