"""Tests for generation/: sampling edge cases and the compiled, batched decode loop.

The decode loop is checked against two small blocks defined here (a masked linear recurrence and a
masked causal average over a positional cache) and against the real Mamba and Transformer models.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
import generation.decode as decode_module
import ssm
from data import ByteTokenizer
from generation import SamplingConfig, filter_logits, generate, left_pad, sample_tokens
from models.layers import RMSNorm
from models.lm import LanguageModel

VOCAB_SIZE = 11
D_MODEL = 8


# ---------------------------------------------------------------------------------------------
# Small blocks that follow the block interface of models/lm.py.


class RecurrentBlock(nnx.Module):
    """x + W_out tanh(h_t) with h_t = 0.8 h_{t-1} + W_in x_t; padded steps leave h unchanged."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.in_proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def _run(self, x_btd, h_bd, mask_bt):
        u_btd = self.in_proj(x_btd)
        if mask_bt is None:
            mask_bt = jnp.ones(x_btd.shape[:2], bool)

        def advance(h_bd, inputs):
            u_bd, real_b = inputs
            h_bd = jnp.where(real_b[:, None], 0.8 * h_bd + u_bd, h_bd)
            return h_bd, h_bd

        h_bd, h_tbd = jax.lax.scan(advance, h_bd, (jnp.swapaxes(u_btd, 0, 1), mask_bt.T))
        return x_btd + self.out_proj(jnp.tanh(jnp.swapaxes(h_tbd, 0, 1))), h_bd

    def __call__(self, x_btd, *, mask=None):
        return self._run(x_btd, jnp.zeros((x_btd.shape[0], x_btd.shape[2])), mask)[0]

    def init_cache(self, batch_size, max_len):
        del max_len  # The state has a fixed size.
        return jnp.zeros((batch_size, self.in_proj.in_features))

    def prefill(self, x_btd, cache, *, mask=None):
        return self._run(x_btd, cache, mask)

    def step(self, x_bd, cache):
        y_btd, cache = self._run(x_bd[:, None], cache, None)
        return y_btd[:, 0], cache


class CausalAverageBlock(nnx.Module):
    """x + W mean(real inputs so far): a positional cache of `max_len` entries, like attention."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_btd, *, mask=None):
        if mask is None:
            mask = jnp.ones(x_btd.shape[:2], bool)
        weights_bt = mask.astype(jnp.float32)
        sums_btd = jnp.cumsum(x_btd * weights_bt[..., None], axis=1)
        counts_bt = jnp.maximum(jnp.cumsum(weights_bt, axis=1), 1.0)
        return x_btd + self.proj(sums_btd / counts_bt[..., None])

    def init_cache(self, batch_size, max_len):
        return {
            "values": jnp.zeros((batch_size, max_len, self.proj.in_features)),
            "real": jnp.zeros((batch_size, max_len), bool),
            "index": jnp.asarray(0, jnp.int32),
        }

    def prefill(self, x_btd, cache, *, mask=None):
        if mask is None:
            mask = jnp.ones(x_btd.shape[:2], bool)
        index = cache["index"]
        values = jax.lax.dynamic_update_slice(cache["values"], x_btd, (0, index, 0))
        real = jax.lax.dynamic_update_slice(cache["real"], mask, (0, index))
        length = x_btd.shape[1]
        max_len = values.shape[1]
        # Position p of the chunk attends to cache entries up to index + p.
        visible_tp = jnp.arange(max_len)[None, :] <= index + jnp.arange(length)[:, None]
        weights_btp = (real[:, None, :] & visible_tp[None]).astype(jnp.float32)
        sums_btd = jnp.einsum("btp,bpd->btd", weights_btp, values)
        counts_bt = jnp.maximum(weights_btp.sum(-1), 1.0)
        y_btd = x_btd + self.proj(sums_btd / counts_bt[..., None])
        return y_btd, {"values": values, "real": real, "index": index + length}

    def step(self, x_bd, cache):
        y_btd, cache = self.prefill(x_bd[:, None], cache)
        return y_btd[:, 0], cache


BLOCKS = {"recurrent": RecurrentBlock, "causal_average": CausalAverageBlock}


def build_toy_model(block_name: str, *, vocab_size=VOCAB_SIZE, pad_multiple=1, seed=0):
    rngs = nnx.Rngs(seed)
    blocks = [BLOCKS[block_name](D_MODEL, rngs=rngs) for _ in range(2)]
    # A large embedding scale spreads the logits, so argmax is not decided by rounding.
    return LanguageModel(vocab_size=vocab_size, d_model=D_MODEL, blocks=blocks,
                         final_norm=RMSNorm(D_MODEL), pad_vocab_size_multiple=pad_multiple,
                         embedding_init_std=1.0, rngs=rngs)


class CountingModel(nnx.Module):
    """Predict (last token + 1) mod vocab with certainty, so that stop positions are known."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _logits(self, tokens):
        return 10.0 * jax.nn.one_hot((tokens + 1) % self.vocab_size, self.vocab_size)

    def init_cache(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, tokens_bt, cache, *, mask=None):
        return self._logits(tokens_bt), cache

    def step(self, tokens_b, cache):
        return self._logits(tokens_b), cache


class UniformModel(CountingModel):
    """Model that gives every token the same logit at every position."""

    def _logits(self, tokens):
        return jnp.zeros(tokens.shape + (self.vocab_size,))


# ---------------------------------------------------------------------------------------------
# Real models.


def build_real_model(name: str):
    if name == "mamba":
        config = ssm.MambaConfig(vocab_size=VOCAB_SIZE, d_model=16, num_layers=2, d_state=4)
        return ssm.build_language_model(config, rngs=nnx.Rngs(0))
    config = attention.TransformerConfig(vocab_size=VOCAB_SIZE, d_model=16, num_layers=2,
                                         num_heads=2)
    return attention.build_language_model(config, rngs=nnx.Rngs(0))


MODEL_NAMES = list(BLOCKS) + ["mamba", "transformer"]


def build_model(name: str):
    if name in BLOCKS:
        return build_toy_model(name)
    return build_real_model(name)


# ---------------------------------------------------------------------------------------------
# Decoding.


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_matches_full_forward_argmax(name):
    model = build_model(name)
    prompt = [3, 1, 4, 1, 5]
    num_new = 6

    result = generate(model, [prompt], max_new_tokens=num_new,
                      sampling=SamplingConfig(temperature=0.0))
    generated = result.tokens[0].tolist()

    # Given the prompt and the generated tokens, the full forward's logits at position
    # len(prompt) - 1 + i must be maximal at generated token i.
    sequence = jnp.asarray([prompt + generated])
    logits_tv = np.asarray(model(sequence)[0])
    for i, token in enumerate(generated):
        row = logits_tv[len(prompt) - 1 + i]
        assert row[token] >= row.max() - 1e-4, (i, token, int(row.argmax()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padded_batch_matches_prompts_run_alone(name):
    model = build_model(name)
    prompts = [[7], [2, 9, 4, 4, 1, 0]]
    sampling = SamplingConfig(temperature=0.0)

    batched = generate(model, prompts, max_new_tokens=4, sampling=sampling)

    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=4, sampling=sampling)
        np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0], err_msg=f"prompt {i}")


def test_sequences_stop_at_stop_token_then_pad():
    model = CountingModel(vocab_size=10)
    stop, pad = 9, 0
    prompts = [[3], [1, 7], [0]]

    result = generate(model, prompts, max_new_tokens=8, sampling=SamplingConfig(temperature=0.0),
                      stop_token=stop, pad_token=pad)

    # Counting up from the last prompt token: 3 -> 4..8 then 9; 7 -> 8 then 9; 0 -> 1..8 (no stop).
    np.testing.assert_array_equal(result.tokens[0], [4, 5, 6, 7, 8, stop, pad, pad])
    np.testing.assert_array_equal(result.tokens[1], [8, stop, pad, pad, pad, pad, pad, pad])
    np.testing.assert_array_equal(result.tokens[2], [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(result.lengths, [5, 1, 8])
    np.testing.assert_array_equal(result.stopped, [True, True, False])
    assert result.token_lists() == [[4, 5, 6, 7, 8], [8], [1, 2, 3, 4, 5, 6, 7, 8]]


def test_decode_compiles_once_per_shape():
    model = build_toy_model("recurrent")
    counts = decode_module.TRACE_COUNTS
    # Shapes that no other test uses (batch 3, 7 new tokens), so the first call must trace.
    prompts = [[1, 2, 3], [4], [5, 6]]
    before = dict(counts)

    generate(model, prompts, max_new_tokens=7, sampling=SamplingConfig(temperature=0.0))
    assert counts["prefill"] == before.get("prefill", 0) + 1
    assert counts["decode_loop"] == before.get("decode_loop", 0) + 1

    generate(model, [[9, 9, 9], [8, 8], [7]], max_new_tokens=7,
             sampling=SamplingConfig(temperature=0.7, top_k=3, top_p=0.9), seed=5)
    assert counts["prefill"] == before.get("prefill", 0) + 1
    assert counts["decode_loop"] == before.get("decode_loop", 0) + 1

    generate(model, [[1, 2, 3, 4], [4], [5, 6]], max_new_tokens=7)
    assert counts["prefill"] == before.get("prefill", 0) + 2


def test_padded_vocabulary_entries_never_sampled():
    vocab_size = 5
    model = build_toy_model("recurrent", vocab_size=vocab_size, pad_multiple=8)
    assert model.padded_vocab_size == 8

    result = generate(model, [[1], [2], [3], [4]] * 4, max_new_tokens=16,
                      sampling=SamplingConfig(temperature=100.0))

    assert result.tokens.max() < vocab_size
    # At this temperature the draw is close to uniform, so every real token shows up.
    assert set(np.unique(result.tokens)) == set(range(vocab_size))


def test_same_seed_gives_same_samples():
    model = build_toy_model("causal_average")
    sampling = SamplingConfig(temperature=1.0)

    first = generate(model, [[1, 2]] * 3, max_new_tokens=8, sampling=sampling, seed=3)
    second = generate(model, [[1, 2]] * 3, max_new_tokens=8, sampling=sampling, seed=3)
    other = generate(model, [[1, 2]] * 3, max_new_tokens=8, sampling=sampling, seed=4)

    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop_token": VOCAB_SIZE}, "stop_token"),
    ({"pad_token": -1}, "pad_token"),
])
def test_generate_rejects_invalid_arguments(kwargs, field):
    model = build_toy_model("recurrent")
    arguments = {"max_new_tokens": 2} | kwargs
    with pytest.raises(ValueError, match=field):
        generate(model, [[1]], **arguments)


def test_generate_rejects_empty_and_out_of_range_prompts():
    model = build_toy_model("recurrent")
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, VOCAB_SIZE]], max_new_tokens=2)


def test_sinusoidal_positions_limit_prompt_plus_new_tokens():
    # With sinusoidal positions, a prompt plus max_new_tokens may be up to max_len tokens long.
    config = attention.TransformerConfig(vocab_size=VOCAB_SIZE, d_model=16, num_layers=1,
                                         num_heads=2, positions="sinusoidal", max_len=16)
    model = attention.build_language_model(config, rngs=nnx.Rngs(0))
    prompt = [1, 2, 3]

    result = generate(model, [prompt], max_new_tokens=13)
    assert result.tokens.shape == (1, 13)
    with pytest.raises(ValueError, match="max_len=17 exceeds the TransformerConfig's max_len=16"):
        generate(model, [prompt], max_new_tokens=14)


def test_left_pad_puts_padding_first():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_token=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])


# ---------------------------------------------------------------------------------------------
# Sampling.


def _arrays(**kwargs):
    return SamplingConfig(**kwargs).as_arrays(vocab_size=4)


def test_temperature_zero_is_greedy_without_nan():
    logits = jnp.asarray([[0.0, 3.0, -1.0, 2.9], [1e30, 0.0, -jnp.inf, 5.0]])
    tokens = sample_tokens(logits, jax.random.key(0), **_arrays(temperature=0.0))
    np.testing.assert_array_equal(tokens, [1, 0])


def test_tiny_top_p_keeps_most_likely_token():
    logits = jnp.asarray([[0.1, 0.3, 0.2, 0.0]])
    filtered = filter_logits(logits, top_k=jnp.asarray(4), top_p=jnp.asarray(1e-9))
    np.testing.assert_array_equal(np.isfinite(filtered[0]), [False, True, False, False])

    for seed in range(10):
        token = sample_tokens(logits, jax.random.key(seed), **_arrays(top_p=1e-9))
        assert int(token[0]) == 1


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = jnp.asarray([[0.5, 0.2, 0.3, 0.0001]])
    logits = jnp.log(probs)
    # Sorted masses: 0.5, 0.3 (cumulative 0.8), 0.2 (cumulative 1.0).
    keep_06 = np.isfinite(filter_logits(logits, top_k=jnp.asarray(4), top_p=jnp.asarray(0.6)))
    keep_085 = np.isfinite(filter_logits(logits, top_k=jnp.asarray(4), top_p=jnp.asarray(0.85)))
    np.testing.assert_array_equal(keep_06[0], [True, False, True, False])
    np.testing.assert_array_equal(keep_085[0], [True, True, True, False])


def test_top_k_ties_break_by_lower_id():
    logits = jnp.asarray([[1.0, 5.0, 5.0, 3.0]])
    keep_1 = np.isfinite(filter_logits(logits, top_k=jnp.asarray(1), top_p=jnp.asarray(1.0)))
    keep_3 = np.isfinite(filter_logits(logits, top_k=jnp.asarray(3), top_p=jnp.asarray(1.0)))
    np.testing.assert_array_equal(keep_1[0], [False, True, False, False])
    np.testing.assert_array_equal(keep_3[0], [False, True, True, True])


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_top_k_outside_vocabulary_rejected(top_k):
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=top_k).validate(vocab_size=4)


@pytest.mark.parametrize("config, field", [
    (SamplingConfig(temperature=-0.1), "temperature"),
    (SamplingConfig(temperature=float("nan")), "temperature"),
    (SamplingConfig(top_p=0.0), "top_p"),
    (SamplingConfig(top_p=1.5), "top_p"),
])
def test_invalid_sampling_settings_rejected(config, field):
    with pytest.raises(ValueError, match=field):
        config.validate(vocab_size=4)


def test_temperature_one_samples_softmax_frequencies():
    probs = np.asarray([0.6, 0.3, 0.1, 0.0])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1))))

    tokens = np.asarray(sample_tokens(logits, jax.random.key(1), **_arrays(temperature=1.0)))

    frequencies = np.bincount(tokens, minlength=4) / tokens.size
    # 4000 draws: the standard error of each frequency is below 0.008.
    np.testing.assert_allclose(frequencies, probs, atol=0.03)


def test_high_temperature_flattens_distribution():
    logits = jnp.log(jnp.asarray(np.tile([0.9, 0.05, 0.05, 1e-9], (4000, 1))))

    tokens = np.asarray(sample_tokens(logits, jax.random.key(2), **_arrays(temperature=50.0)))

    frequencies = np.bincount(tokens, minlength=4) / tokens.size
    assert frequencies.max() < 0.4


# ---------------------------------------------------------------------------------------------
# Checkpoints and the command line.


CONFIG_FILES = {"mamba": "configs/mamba_lm.py", "transformer": "configs/transformer_lm.py"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def _tiny_config(architecture: str):
    path = REPO_ROOT / CONFIG_FILES[architecture]
    spec = importlib.util.spec_from_file_location(f"{architecture}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def save_tiny_run(workdir: Path, architecture: str, config_file: str | None = None,
                  **model_overrides) -> nnx.Module:
    """Write a training workdir holding one checkpoint of a tiny model; return that model.

    The saved model is initialised with a seed other than the config's, so a loader that ignored
    the checkpoint and built fresh parameters would produce a different model. `config_file`
    replaces the architecture's text config (for a synthetic task's), and `model_overrides`
    set model fields.
    """
    from models.registry import build_model
    from training import checkpoint, create_train_state
    from training.config import load_config_file
    from training.optimizer import build_optimizer, learning_rate_schedule

    if config_file is None:
        config = _tiny_config(architecture)
    else:
        config = load_config_file(str(REPO_ROOT / config_file) + ":tiny")
    for name, value in model_overrides.items():
        config.model[name] = value
    model = build_model(config.model, rngs=nnx.Rngs(config.train.seed + 1))
    num_steps = config.train.num_steps
    state = create_train_state(model, build_optimizer(config.optimizer, num_steps),
                               learning_rate_schedule(config.optimizer, num_steps))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_config(workdir, config)
    manager = checkpoint.checkpoint_manager(workdir, keep=1)
    checkpoint.save_checkpoint(manager, state)
    manager.wait_until_finished()
    manager.close()
    return model


@pytest.mark.parametrize("architecture", ["mamba", "transformer"])
def test_checkpoint_greedy_matches_full_forward(tmp_path, architecture):
    from training import load_run

    saved_model = save_tiny_run(tmp_path / "run", architecture)
    model, _ = load_run(tmp_path / "run")
    prompt = [256, *b"def f(x):"]
    sampling = SamplingConfig(temperature=0.0)

    loaded = generate(model, [prompt], max_new_tokens=6, sampling=sampling)
    saved = generate(saved_model, [prompt], max_new_tokens=6, sampling=sampling)

    np.testing.assert_array_equal(loaded.tokens, saved.tokens)
    logits_tv = np.asarray(model(jnp.asarray([prompt + loaded.tokens[0].tolist()]))[0])
    for i, token in enumerate(loaded.tokens[0]):
        row = logits_tv[len(prompt) - 1 + i]
        assert row[token] >= row.max() - 1e-4, (i, token, int(row.argmax()))


def _run_generate_script(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate.py"), *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_generate_script_prints_greedy_samples(tmp_path):
    saved_model = save_tiny_run(tmp_path / "run", "mamba")
    tokenizer = ByteTokenizer()
    prompt = [tokenizer.SEPARATOR, *b"import "]
    expected = generate(saved_model, [prompt], max_new_tokens=5,
                        sampling=SamplingConfig(temperature=0.0),
                        stop_token=tokenizer.SEPARATOR).token_lists()[0]

    result = _run_generate_script(f"--workdir={tmp_path / 'run'}", "--prompt=import ",
                                  "--max_new_tokens=5", "--num_samples=2", "--temperature=0")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("--- sample")]
    assert len(headers) == 2
    # Each sample is printed as the prompt followed by the decoded continuation.
    samples = ["\n".join(lines[start + 1:end])
               for start, end in zip(headers, headers[1:] + [len(lines)], strict=True)]
    assert samples == ["import " + tokenizer.decode(expected)] * 2


def test_decode_steps_draw_fresh_keys():
    # Uniform logits at every step: a loop that reused one random key would draw the same token
    # every time, while fresh draws over 100 tokens give dozens of distinct ones.
    model = UniformModel(vocab_size=100)

    result = generate(model, [[0]], max_new_tokens=64, sampling=SamplingConfig(temperature=1.0))

    assert len(set(result.tokens[0].tolist())) > 30


@pytest.mark.parametrize("flag, allowed", [
    ("--top_k=0", ">= 1"),
    ("--top_k=258", "between 1 and the vocabulary size 257"),
    ("--top_p=1.5", "in (0, 1]"),
    ("--temperature=-1", ">= 0"),
    ("--max_new_tokens=0", ">= 1"),
])
def test_generate_script_rejects_bad_flag(tmp_path, flag, allowed):
    result = _run_generate_script(f"--workdir={tmp_path}", flag)

    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    name, value = flag.split("=")
    # The message names the flag as it is typed, the value given and the allowed range.
    assert f"error: {name} must" in error_lines[0], error_lines[0]
    assert allowed in error_lines[0], error_lines[0]
    assert value in error_lines[0], error_lines[0]


def test_readme_generation_snippet(tmp_path, monkeypatch):
    # The README's Python example, run as written on a saved tiny run in place of runs/mamba.
    save_tiny_run(tmp_path / "runs" / "mamba", "mamba")
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    snippet = next(block for block in blocks if "from generation import" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102

    result, tokenizer = namespace["result"], namespace["tokenizer"]
    samples = result.token_lists()
    assert len(samples) == 2
    for ids, stopped, row in zip(samples, result.stopped, result.tokens, strict=True):
        assert len(ids) <= 50
        assert tokenizer.SEPARATOR not in ids
        # A sample shorter than 50 ids ended at the separator, which follows it in the tokens.
        assert stopped == (len(ids) < 50)
        if stopped:
            assert row[len(ids)] == tokenizer.SEPARATOR


@pytest.mark.parametrize("run, flags, message", [
    ({"architecture": "mamba", "config_file": "configs/induction_heads.py"}, [],
     "is a run of the synthetic task 'induction_heads', whose tokens are not text"),
    ({"architecture": "mamba"}, ["--prompt=\udcff\udcfe"],
     r"--prompt is not valid text \(surrogates not allowed at characters 0 to 1\)"),
    ({"architecture": "transformer", "positions": "sinusoidal", "max_len": 16},
     ["--prompt=abc", "--max_new_tokens=20"],
     r"--prompt of 3 bytes with --max_new_tokens=20: .*max_len"),
])
def test_generate_script_rejects_run_or_prompt(tmp_path, run, flags, message):
    save_tiny_run(tmp_path / "run", **run)
    result = _run_generate_script(f"--workdir={tmp_path / 'run'}", *flags)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    assert re.search(message, error_lines[0]), error_lines[0]


def _readme_models_snippet(architecture: str) -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    snippet = next(block for block in blocks if "model.init_cache(batch_size=2" in block)
    if architecture == "transformer":
        # Each commented "NAME = attention..." line replaces the line above it.
        snippet = re.sub(r"^.*\n# (\w+ = attention\..*)$", r"\1", snippet, flags=re.MULTILINE)
    return snippet


@pytest.mark.parametrize("architecture", ["mamba", "transformer"])
def test_readme_models_snippet(architecture):
    snippet = _readme_models_snippet(architecture)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102

    model, tokens, next_tokens = namespace["model"], namespace["tokens"], namespace["next_tokens"]
    expected_type = ssm.MambaConfig if architecture == "mamba" else attention.TransformerConfig
    assert isinstance(namespace["config"], expected_type)
    assert namespace["logits"].shape == (2, 257)
    # Each row's step logits equal the full forward of its prompt alone plus the next token.
    for row, prompt in enumerate([[104, 105], [100, 101, 102, 103]]):
        sequence = jnp.asarray([prompt + [int(next_tokens[row])]], jnp.int32)
        expected = model(sequence)[0, -1]
        np.testing.assert_allclose(namespace["logits"][row], expected, rtol=1e-4, atol=1e-4)
    assert tokens.shape == (2, 4)
