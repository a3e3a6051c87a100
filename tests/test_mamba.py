"""Mamba mixer, block and language model: cached decoding, masking, causality, initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssm import SCAN_MODES
from ssm.mamba import (CausalConv1d, MambaConfig, TimeInvariantSSMInputs, build_language_model,
                       dt_bias_init)

VOCAB = 32
LENGTH = 13  # one sequence length for most tests, so each jitted function compiles once


def tiny_config(**overrides) -> MambaConfig:
    fields = dict(vocab_size=VOCAB, d_model=16, num_layers=2, d_state=4, expand=2, d_conv=4)
    fields.update(overrides)
    return MambaConfig(**fields)


class CompiledModel:
    """A model split into graph definition and state, with its three call modes under jax.jit."""

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.state = state
        self.init_cache = model.init_cache

        def forward(state, tokens, mask):
            return nnx.merge(graphdef, state)(tokens, mask=mask)

        def prefill(state, tokens, cache, mask):
            return nnx.merge(graphdef, state).prefill(tokens, cache, mask=mask)

        def step(state, tokens, cache):
            return nnx.merge(graphdef, state).step(tokens, cache)

        self._forward = jax.jit(forward)
        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step)

    def forward(self, tokens, mask=None):
        return self._forward(self.state, tokens, mask)

    def prefill(self, tokens, cache, mask=None):
        return self._prefill(self.state, tokens, cache, mask)

    def step(self, tokens, cache):
        return self._step(self.state, tokens, cache)


@pytest.fixture(scope="module", params=[True, False], ids=["selective", "non_selective"])
def compiled_model(request):
    return CompiledModel(build_language_model(tiny_config(selective=request.param),
                                              rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def selective_model():
    return CompiledModel(build_language_model(tiny_config(), rngs=nnx.Rngs(0)))


def random_tokens(batch, length, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


def test_step_decoding_matches_full_forward(compiled_model):
    tokens = random_tokens(2, LENGTH)
    full_logits = compiled_model.forward(tokens)

    cache = compiled_model.init_cache(2, LENGTH)
    for t in range(LENGTH):
        step_logits, cache = compiled_model.step(tokens[:, t], cache)
        np.testing.assert_allclose(step_logits, full_logits[:, t], atol=1e-5,
                                   err_msg=f"position {t}")


@pytest.mark.parametrize("prompt_length", [1, 2, 3, 4, 5])
def test_prefill_then_steps_matches_full_forward(selective_model, prompt_length):
    # d_conv is 4, so prompts of 1..3 tokens are shorter than the convolution window.
    tokens = random_tokens(2, LENGTH, seed=prompt_length)
    full_logits = selective_model.forward(tokens)

    cache = selective_model.init_cache(2, LENGTH)
    prompt_logits, cache = selective_model.prefill(tokens[:, :prompt_length], cache)
    np.testing.assert_allclose(prompt_logits, full_logits[:, :prompt_length], atol=1e-5)

    for t in range(prompt_length, prompt_length + 8):
        step_logits, cache = selective_model.step(tokens[:, t], cache)
        np.testing.assert_allclose(step_logits, full_logits[:, t], atol=1e-5,
                                   err_msg=f"position {t}")


@pytest.mark.parametrize("chunk_length", [3, 5])
def test_chunked_prefill_matches_full_forward(selective_model, chunk_length):
    # 13 tokens in chunks of 3 (3, 3, 3, 3, 1) or 5 (5, 5, 3).
    tokens = random_tokens(2, LENGTH, seed=1)
    full_logits = selective_model.forward(tokens)

    cache = selective_model.init_cache(2, LENGTH)
    chunk_logits = []
    for start in range(0, LENGTH, chunk_length):
        logits, cache = selective_model.prefill(tokens[:, start:start + chunk_length], cache)
        chunk_logits.append(logits)

    np.testing.assert_allclose(jnp.concatenate(chunk_logits, axis=1), full_logits, atol=1e-5)


@pytest.mark.parametrize("scan", SCAN_MODES)
@pytest.mark.parametrize("selective", [True, False], ids=["selective", "non_selective"])
def test_left_padded_masked_matches_alone(selective, scan):
    # Chunks of 2 steps put a chunk boundary inside the padding (positions 0 to 2) and several
    # after it.
    compiled_model = CompiledModel(build_language_model(
        tiny_config(selective=selective, scan=scan, chunk_size=2), rngs=nnx.Rngs(0)))
    # Given 13 tokens alone, and their first 10 after 3 padding tokens of arbitrary value, in a
    # batch whose other row is unpadded.
    alone = random_tokens(2, LENGTH, seed=2)
    padded = jnp.concatenate([jnp.full((1, 3), 7, jnp.int32), alone[:1, :10]], axis=1)
    batch = jnp.concatenate([padded, alone[1:]], axis=0)
    mask = jnp.asarray([[False] * 3 + [True] * 10, [True] * LENGTH])
    alone_logits = compiled_model.forward(alone)

    # When the batch runs with the mask, as a whole and as a prefill of 10 then 3 steps.
    batch_logits = compiled_model.forward(batch, mask)
    cache = compiled_model.init_cache(2, LENGTH + 3)
    _, cache = compiled_model.prefill(batch[:, :10], cache, mask[:, :10])
    step_logits = []
    for t in range(10, LENGTH):
        logits, cache = compiled_model.step(batch[:, t], cache)
        step_logits.append(logits)

    # Then the real positions of the padded row match the sequence alone.
    np.testing.assert_allclose(batch_logits[0, 3:], alone_logits[0, :10], atol=1e-5)
    np.testing.assert_allclose(batch_logits[1], alone_logits[1], atol=1e-5)
    np.testing.assert_allclose(jnp.stack(step_logits, axis=1)[0], alone_logits[0, 7:10],
                               atol=1e-5)


def test_changing_token_changes_no_earlier_output(compiled_model):
    tokens = random_tokens(2, LENGTH, seed=5)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)

    logits = compiled_model.forward(tokens)
    changed_logits = compiled_model.forward(changed)

    np.testing.assert_array_equal(changed_logits[:, :6], logits[:, :6])
    assert float(jnp.abs(changed_logits[:, 6] - logits[:, 6]).max()) > 1e-4
    assert float(jnp.abs(changed_logits[:, -1] - logits[:, -1]).max()) > 1e-6


@pytest.mark.parametrize("selective", [True, False], ids=["selective", "non_selective"])
def test_initialisation_follows_mamba_paper(selective):
    config = tiny_config(d_model=32, d_state=8, dt_min=0.002, dt_max=0.05, selective=selective)
    model = build_language_model(config, rngs=nnx.Rngs(1))
    expected_A = -np.arange(1, 9, dtype=np.float32)

    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        if selective:
            dt_bias = mixer.dt_proj.bias[...]
            bound = config.resolved_dt_rank ** -0.5
            assert float(jnp.abs(mixer.dt_proj.kernel[...]).max()) <= bound
        else:
            dt_bias = mixer.time_invariant.bias[...]
        dt = np.asarray(jax.nn.softplus(dt_bias))

        assert dt.shape == (config.d_inner,)
        assert dt.min() >= 0.002 * (1 - 1e-5), f"layer {index}"
        assert dt.max() <= 0.05 * (1 + 1e-5), f"layer {index}"
        # Log-uniform over a 25x range: 64 draws all on one side of 0.01 is a 2^-63 event.
        assert dt.min() < 0.01 < dt.max(), f"layer {index}"
        np.testing.assert_allclose(-np.exp(mixer.A_log[...]),
                                   np.broadcast_to(expected_A, (config.d_inner, 8)), rtol=1e-6)
        np.testing.assert_array_equal(mixer.D[...], np.ones(config.d_inner))


def test_dt_bias_init_applies_floor():
    # A floor of 0.01 inside [dt_min, dt_max] = [0.001, 0.1]: log-uniform draws fall below it
    # with probability log(10) / log(100) = 1/2, and those draws start at the floor.
    init = dt_bias_init(dt_min=0.001, dt_max=0.1, dt_init_floor=0.01)
    dt = np.asarray(jax.nn.softplus(init(jax.random.key(0), (4096,))), np.float64)

    at_floor = np.isclose(dt, 0.01, rtol=1e-4)
    above = dt[~at_floor]
    assert dt.min() >= 0.01 * (1 - 1e-4)
    assert dt.max() <= 0.1 * (1 + 1e-4)
    # Binomial(4096, 1/2) draws: 0.45 and 0.55 are more than 6 standard deviations away.
    assert 0.45 < at_floor.mean() < 0.55
    # The rest are log-uniform in [0.01, 0.1], so half of them lie below sqrt(0.01 * 0.1).
    assert above.min() > 0.01
    assert 0.45 < np.mean(above < np.sqrt(0.01 * 0.1)) < 0.55


def test_conv_init_bound_is_inverse_sqrt_width():
    # PyTorch's Conv1d default: uniform in +-1/sqrt(fan_in), and a depthwise kernel of width 4
    # has fan_in 4, so the bound is 1/2. Among 4096 or more uniform draws, some land within 1%
    # of the bound.
    conv = CausalConv1d(4096, 4, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
    kernel = np.abs(np.asarray(conv.kernel[...]))
    bias = np.abs(np.asarray(conv.bias[...]))

    assert kernel.max() <= 0.5
    assert kernel.max() > 0.495
    assert bias.max() <= 0.5
    assert bias.max() > 0.495


def test_time_invariant_c_is_standard_normal():
    config = tiny_config(selective=False, d_state=2048)
    params = TimeInvariantSSMInputs(config, rngs=nnx.Rngs(0))
    C = np.asarray(params.C[...])

    np.testing.assert_array_equal(params.B[...], np.ones(2048))
    # Sample mean and std of 2048 standard normal draws: errors about 0.02 and 0.016.
    assert abs(C.mean()) < 0.1
    assert 0.9 < C.std() < 1.1


def test_non_selective_mixer_matches_recurrence():
    # The time-invariant mixer uses dt = softplus(bias) per channel and one B and one C for all
    # channels and time steps. Its output depends only on the products B_n C_n, so only the
    # final state distinguishes B from C.
    model = build_language_model(tiny_config(selective=False), rngs=nnx.Rngs(0))
    mixer = model.blocks[0].mixer
    params = mixer.time_invariant
    x_btd = jax.random.normal(jax.random.key(3), (2, 6, mixer.config.d_model))

    x = np.asarray(mixer.scan_inputs(x_btd)[0], np.float64)
    dt_e = np.log1p(np.exp(np.asarray(params.bias[...], np.float64)))
    A_en = -np.exp(np.asarray(mixer.A_log[...], np.float64))
    B_n = np.asarray(params.B[...], np.float64)
    C_n = np.asarray(params.C[...], np.float64)
    h_ben = np.zeros(x.shape[:1] + A_en.shape)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h_ben = np.exp(dt_e[:, None] * A_en) * h_ben + (dt_e * x[:, t])[..., None] * B_n
        y[:, t] = h_ben @ C_n
    z = np.asarray(jnp.split(mixer.in_proj(x_btd), 2, axis=-1)[1], np.float64)
    gated = (y + x * np.asarray(mixer.D[...])) * z / (1 + np.exp(-z))
    expected = np.asarray(mixer.out_proj(jnp.asarray(gated, jnp.float32)))

    output, cache = mixer.prefill(x_btd, mixer.init_cache(2))

    np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.ssm_state), h_ben, rtol=1e-4, atol=1e-6)


def test_parameter_names_match_weight_decay_rules():
    model = build_language_model(tiny_config(conv_bias=True, bias=True), rngs=nnx.Rngs(0))
    names = {"/".join(str(key) for key in path)
             for path, _ in nnx.to_flat_state(nnx.state(model.blocks[0], nnx.Param))}

    assert names >= {"norm/scale", "mixer/in_proj/kernel", "mixer/in_proj/bias",
                     "mixer/conv1d/kernel", "mixer/conv1d/bias", "mixer/x_proj/kernel",
                     "mixer/dt_proj/kernel", "mixer/dt_proj/bias", "mixer/A_log", "mixer/D",
                     "mixer/out_proj/kernel", "mixer/out_proj/bias"}


def test_non_selective_ssm_inputs_are_constant():
    model = build_language_model(tiny_config(selective=False), rngs=nnx.Rngs(0))
    mixer = model.blocks[0].mixer
    x1 = jax.random.normal(jax.random.key(0), (1, 5, mixer.config.d_inner))
    x2 = jax.random.normal(jax.random.key(1), (1, 5, mixer.config.d_inner))

    assert mixer.x_proj is None
    for first, second in zip(mixer._ssm_inputs(x1), mixer._ssm_inputs(x2)):
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(first[0, 0], first[0, -1])


@pytest.mark.parametrize("selective", [True, False])
def test_scan_inputs_rebuild_mixer_output(selective):
    # The mixer's output is out_proj((y + D x) * silu(z)), with y the plain recurrence run on
    # the scan inputs and z the second half of in_proj.
    model = build_language_model(tiny_config(selective=selective), rngs=nnx.Rngs(0))
    mixer = model.blocks[0].mixer
    x_btd = jax.random.normal(jax.random.key(2), (2, 6, mixer.config.d_model))

    x, dt, A, B, C = (np.asarray(array, np.float64) for array in mixer.scan_inputs(x_btd))
    h_ben = np.zeros(x.shape[:1] + A.shape)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        decay_ben = np.exp(dt[:, t, :, None] * A)
        h_ben = decay_ben * h_ben + (dt[:, t] * x[:, t])[..., None] * B[:, t, None]
        y[:, t] = np.einsum("ben,bn->be", h_ben, C[:, t])
    z = np.asarray(jnp.split(mixer.in_proj(x_btd), 2, axis=-1)[1], np.float64)
    gated = (y + x * np.asarray(mixer.D[...])) * z / (1 + np.exp(-z))
    expected = np.asarray(mixer.out_proj(jnp.asarray(gated, jnp.float32)))

    np.testing.assert_allclose(np.asarray(mixer(x_btd)), expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_keeps_float32_parameters_and_state():
    model = build_language_model(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = random_tokens(2, 5)

    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert param[...].dtype == jnp.float32, path
    logits, cache = model.prefill(tokens, model.init_cache(2, 5))
    assert logits.dtype == jnp.float32
    for block_cache in cache:
        assert block_cache.ssm_state.dtype == jnp.float32
        assert block_cache.conv_inputs.dtype == jnp.bfloat16


def test_bfloat16_training_stays_finite():
    # Given a bfloat16-compute model and a fixed batch of random tokens.
    model = build_language_model(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = random_tokens(4, 17, seed=7)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def sgd_step(params, _):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        return params, loss

    # When 200 plain SGD steps run.
    params, losses = jax.jit(lambda p: jax.lax.scan(sgd_step, p, length=200))(params)

    # Then every loss and parameter is finite, and the model has fitted the batch somewhat.
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    assert float(losses[-1]) < float(losses[0]) - 0.5


@pytest.mark.parametrize(("field", "value", "message"), [
    ("d_state", 0, r"d_state must be an integer >= 1, got 0"),
    ("expand", -1, r"expand must be an integer >= 1, got -1"),
    ("d_conv", 0, r"d_conv must be an integer >= 1, got 0"),
    ("scan", "fast",
     r"scan must be one of \('associative', 'sequential', 'chunked', 'cpu_kernel'\), got 'fast'"),
    ("chunk_size", 0, r"chunk_size must be an integer >= 1, got 0"),
    ("dt_rank", 0, r"dt_rank must be an integer >= 1, got 0"),
    ("dtype", "float16", r"dtype must be one of \('float32', 'bfloat16'\).*got 'float16'"),
    ("dt_min", 0.5, r"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got dt_min=0.5"),
])
def test_config_rejects_invalid_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_rejects_large_state_for_kernel():
    # On every backend, so that a config does not work on one machine only.
    with pytest.raises(ValueError, match=r"scan 'cpu_kernel' supports d_state up to 64, got 65"):
        tiny_config(scan="cpu_kernel", d_state=65)
    assert tiny_config(scan="sequential", d_state=65).d_state == 65


def test_config_normalises_dtype_to_name():
    config = tiny_config(dtype=jnp.bfloat16, dt_rank="auto")

    assert config.dtype == "bfloat16"
    assert config.compute_dtype == jnp.bfloat16
    assert config.resolved_dt_rank == 1  # ceil(16 / 16)
