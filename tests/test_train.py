"""Tests of the training job: configs, optimizer, steps, checkpoints, resume, signals, bad input.

Runs use the `tiny` variants on a small text corpus written by the tests, so every run takes
seconds. Tests that need a fresh process (SIGTERM, forced CPU devices, the command line) start
`train.py` or a short script with the repository's interpreter.
"""

import importlib.util
import json
import logging
import math
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from models.registry import build_model, count_parameters
from training import checkpoint, load_run, train_and_evaluate
from training.config import validate_config
from training.loop import TrainingDivergedError, initial_train_state
from training.metrics import QuietLibraries, read_metrics
from training.optimizer import build_optimizer, learning_rate_schedule, weight_decay_mask
from training.sharding import data_mesh
from training.steps import create_train_state, eval_step, train_step

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(path for path in (REPO / "configs").glob("*.py")
                      if path.name != "__init__.py")
ARCHITECTURE_FILES = {"mamba": REPO / "configs" / "mamba_lm.py",
                      "transformer": REPO / "configs" / "transformer_lm.py"}

# Python-like text with enough structure for a tiny model to learn within a few dozen steps.
CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n\n",
    "for index in range(10):\n    print(index)\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
    "if value is None:\n    raise ValueError('value is missing')\n\n",
]


@functools.cache
def load_config_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    rng = np.random.default_rng(0)
    path.write_text("".join(CORPUS_LINES[i] for i in rng.integers(0, len(CORPUS_LINES), 600)))
    return path


@functools.cache
def parameter_count(path: Path, variant: str) -> int:
    return count_parameters(load_config_module(path).get_config(variant).model)


def tiny_config(corpus: Path, architecture: str = "mamba", **overrides):
    """Return the tiny variant reading `corpus`, with dotted-path overrides ("train.num_steps")."""
    config = load_config_module(ARCHITECTURE_FILES[architecture]).get_config("tiny")
    config.data.path = str(corpus)
    config.data.val_fraction = 0.1
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


def train_losses(workdir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(workdir, "train")]


def checkpoint_listing(workdir: Path) -> dict[str, float]:
    """Return every file under the workdir's checkpoint folder with its modification time."""
    root = workdir / checkpoint.CHECKPOINT_DIR
    return {str(path.relative_to(root)): path.stat().st_mtime
            for path in sorted(root.rglob("*"))}


def tree_signature(tree) -> list:
    """Return the paths, shapes, dtypes and shardings of a pytree's leaves."""
    return [(jax.tree_util.keystr(path), leaf.shape, leaf.dtype, getattr(leaf, "sharding", None))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def flat_params(tree) -> dict[str, np.ndarray]:
    """Return the leaves of a parameter tree by "/"-joined path, with list indices as strings."""
    return {"/".join(str(key.key) for key in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def readme_parameter_count(model_name: str) -> int:
    """Return the parameter count in the README's table row of `model_name`."""
    readme = (REPO / "README.md").read_text()
    match = re.search(rf"^\| {re.escape(model_name)} \| ([0-9,]+) \|", readme, re.MULTILINE)
    assert match, f"no README table row for {model_name}"
    return int(match.group(1).replace(",", ""))


def run_python(args: list[str], env_overrides: dict[str, str] | None = None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_overrides or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


# ---- configs


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda path: path.name)
def test_config_file_builds_every_variant(config_file):
    module = load_config_module(config_file)
    assert "python train.py --config=configs/" in module.__doc__
    for variant in module.VARIANTS:
        config = module.get_config(variant)
        validate_config(config, num_devices=1)
        assert parameter_count(config_file, variant) > 0, variant


def test_parameter_counts_match_across_architectures():
    mamba = load_config_module(ARCHITECTURE_FILES["mamba"])
    transformer = load_config_module(ARCHITECTURE_FILES["transformer"])
    assert set(mamba.VARIANTS) == set(transformer.VARIANTS)
    for variant in mamba.VARIANTS:
        mamba_count = parameter_count(ARCHITECTURE_FILES["mamba"], variant)
        transformer_count = parameter_count(ARCHITECTURE_FILES["transformer"], variant)
        assert abs(transformer_count / mamba_count - 1) <= 0.10, (
            variant, mamba_count, transformer_count)


def test_mamba_default_parameter_count():
    model = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config().model
    # The formula assumes these fields, and the defaults conv_bias=True and bias=False, which
    # the config file leaves unset.
    assert model.dt_rank == "auto"
    assert model.tie_embeddings
    assert model.selective
    d, n, w = model.d_model, model.d_state, model.d_conv
    e = model.expand * d
    dt_rank = math.ceil(d / 16)
    multiple = model.pad_vocab_size_multiple
    padded_vocab = math.ceil(model.vocab_size / multiple) * multiple
    block = (d  # RMSNorm scale
             + d * 2 * e  # in_proj to x and the gate z, no bias
             + w * e + e  # depthwise convolution kernel and bias
             + e * (dt_rank + 2 * n)  # x_proj to dt, B and C
             + dt_rank * e + e  # dt_proj kernel and bias
             + e * n  # A_log
             + e  # D
             + e * d)  # out_proj, no bias
    expected = padded_vocab * d + model.num_layers * block + d  # tied embedding, final norm

    assert parameter_count(ARCHITECTURE_FILES["mamba"], "") == expected
    assert readme_parameter_count("Mamba") == expected


def test_transformer_default_parameter_count():
    model = load_config_module(ARCHITECTURE_FILES["transformer"]).get_config().model
    # The formula assumes Transformer++ (RMSNorm, SwiGLU, no biases) with a tied embedding.
    assert model.flavour == "transformer++"
    assert model.tie_embeddings
    d = model.d_model
    head_dim = model.head_dim or d // model.num_heads
    kv_heads = model.num_kv_heads or model.num_heads
    multiple = model.pad_vocab_size_multiple
    padded_vocab = math.ceil(model.vocab_size / multiple) * multiple
    attention = (d * model.num_heads * head_dim  # query
                 + 2 * d * kv_heads * head_dim  # key and value
                 + model.num_heads * head_dim * d)  # output
    feed_forward = 3 * d * model.ffn_dim  # SwiGLU gate, up and down projections
    block = 2 * d + attention + feed_forward  # two RMSNorm scales
    expected = padded_vocab * d + model.num_layers * block + d  # tied embedding, final norm

    assert parameter_count(ARCHITECTURE_FILES["transformer"], "") == expected
    assert readme_parameter_count("Transformer++") == expected


def test_training_sections_match_across_architectures():
    mamba = load_config_module(ARCHITECTURE_FILES["mamba"])
    transformer = load_config_module(ARCHITECTURE_FILES["transformer"])
    for variant in mamba.VARIANTS:
        for section in ("data", "optimizer", "train"):
            assert (mamba.get_config(variant)[section].to_dict()
                    == transformer.get_config(variant)[section].to_dict()), (variant, section)


def test_unknown_variant_names_allowed_ones():
    module = load_config_module(ARCHITECTURE_FILES["mamba"])
    with pytest.raises(ValueError, match="unknown config variant 'huge'.*'tiny'"):
        module.get_config("huge")


def test_unknown_model_field_names_allowed_ones():
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny").model.to_dict()
    config["d_modle"] = 8
    with pytest.raises(ValueError, match="d_modle.*allowed fields: .*d_model"):
        build_model(config, rngs=nnx.Rngs(0))


def test_unknown_architecture_names_allowed_ones():
    with pytest.raises(ValueError, match="'rwkv'.*'mamba', 'transformer'"):
        build_model({"architecture": "rwkv"}, rngs=nnx.Rngs(0))


# ---- optimizer and steps


def test_weight_decay_mask_follows_parameter_names():
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny")
    _, params = nnx.split(build_model(config.model, rngs=nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(nnx.to_pure_dict(params))
    decayed = {jax.tree_util.keystr(path): flag
               for path, flag in jax.tree_util.tree_leaves_with_path(mask)}

    for path, flag in decayed.items():
        last_name = path.rsplit("[", 1)[-1].strip("']")
        if last_name in ("A_log", "D", "bias", "scale", "embedding"):
            assert not flag, path
    assert decayed["['blocks'][0]['mixer']['in_proj']['kernel']"]
    assert decayed["['blocks'][0]['mixer']['out_proj']['kernel']"]
    assert not decayed["['blocks'][0]['mixer']['A_log']"]
    assert not decayed["['embedding']['embedding']"]


def test_weight_decay_skips_vectors():
    # The non-selective Mamba learns B and C as vectors of d_state entries, with names that are
    # not in NO_DECAY_NAMES. Vectors never get weight decay, whatever their name.
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny")
    config.model.selective = False
    _, params = nnx.split(build_model(config.model, rngs=nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(nnx.to_pure_dict(params))
    decayed = {jax.tree_util.keystr(path): flag
               for path, flag in jax.tree_util.tree_leaves_with_path(mask)}

    assert not decayed["['blocks'][0]['mixer']['time_invariant']['B']"]
    assert not decayed["['blocks'][0]['mixer']['time_invariant']['C']"]
    assert decayed["['blocks'][0]['mixer']['in_proj']['kernel']"]


def test_optimizer_clips_gradient_before_adam():
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny").optimizer
    config.grad_clip_norm = 1.0
    tx = build_optimizer(config, num_steps=10)
    params = {"kernel": jnp.zeros((1, 2))}
    grads = {"kernel": jnp.asarray([[60.0, 80.0]])}  # global norm 100
    _, opt_state = tx.update(grads, tx.init(params), params)

    # Adam's first moment after one step is (1 - b1) times the gradient it received, here the
    # gradient scaled to global norm 1.
    adam_state = opt_state[1][0]
    np.testing.assert_allclose(np.asarray(adam_state.mu["kernel"]),
                               [[(1 - config.b1) * 0.6, (1 - config.b1) * 0.8]], rtol=1e-6)


def test_learning_rate_warmup_then_cosine():
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny").optimizer
    config.unlock()
    config.learning_rate, config.warmup_steps, config.final_learning_rate_fraction = 1.0, 10, 0.1
    schedule = learning_rate_schedule(config, num_steps=110)

    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(0.1)


def test_late_phase_learning_rate_constant():
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny").optimizer
    config.unlock()
    config.learning_rate, config.warmup_steps, config.final_learning_rate_fraction = 1.0, 10, 0.1
    config.late_phase_step, config.late_phase_learning_rate = 60, 3.0
    schedule = learning_rate_schedule(config, num_steps=110)

    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(35)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # midpoint of 10..60
    assert float(schedule(59)) == pytest.approx(0.1, abs=1e-3)
    assert float(schedule(60)) == pytest.approx(3.0)
    assert float(schedule(110)) == pytest.approx(3.0)


@pytest.mark.parametrize("step,rate,message", [
    (100, 0.0, r"late_phase_learning_rate=0.0; allowed: a finite number > 0"),
    (100, math.inf, r"late_phase_learning_rate=inf; allowed: a finite number > 0"),
    (0, 1e-2, r"late_phase_learning_rate=0.01; allowed: 0 while optimizer.late_phase_step is 0"),
    (1, 1e-2, r"late_phase_step=1; allowed: 0 \(no late phase\) or an integer >= "
              r"optimizer.warmup_steps \(2\)"),
    (-5, 1e-2, r"late_phase_step=-5; allowed: 0 \(no late phase\)"),
])
def test_bad_late_phase_is_rejected(step, rate, message):
    config = load_config_module(ARCHITECTURE_FILES["mamba"]).get_config("tiny")
    config.optimizer.warmup_steps = 2
    config.optimizer.late_phase_step, config.optimizer.late_phase_learning_rate = step, rate
    with pytest.raises(ValueError, match=message):
        validate_config(config, num_devices=1)


def test_gradient_accumulation_matches_one_full_batch(corpus_file):
    config = tiny_config(corpus_file)
    mesh = data_mesh()
    state = initial_train_state(config, mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 17)), jnp.int32)

    full_state, full_metrics = jax.jit(train_step)(state, tokens.reshape(1, 8, 17))
    micro_state, micro_metrics = jax.jit(train_step)(state, tokens.reshape(4, 2, 17))

    assert float(micro_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-5)
    assert float(micro_metrics["grad_norm"]) == pytest.approx(
        float(full_metrics["grad_norm"]), rel=1e-4)
    for full, micro in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(micro_state.params)):
        np.testing.assert_allclose(np.asarray(micro), np.asarray(full), rtol=1e-4, atol=1e-6)


def test_loss_targets_next_token(corpus_file):
    state = initial_train_state(tiny_config(corpus_file, "transformer"))
    tokens = np.random.default_rng(1).integers(0, 256, (8, 17))
    logits = np.asarray(state.model()(jnp.asarray(tokens[:, :-1], jnp.int32)), np.float64)

    # Cross entropy in float64 numpy of the logits at position t against token t + 1.
    max_logits = logits.max(axis=-1)
    log_normalizers = max_logits + np.log(np.exp(logits - max_logits[..., None]).sum(axis=-1))
    target_logits = np.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    expected = np.mean(log_normalizers - target_logits)

    _, train_metrics = jax.jit(train_step)(state, jnp.asarray(tokens[None], jnp.int32))
    eval_metrics = jax.jit(eval_step)(state, jnp.asarray(tokens, jnp.int32))

    assert float(train_metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(eval_metrics["token_count"]) == 8 * 16
    assert float(eval_metrics["loss_sum"]) / (8 * 16) == pytest.approx(expected, rel=1e-5)


def test_initial_parameters_follow_seed(corpus_file):
    def initial_params(seed):
        state = initial_train_state(tiny_config(corpus_file, train__seed=seed))
        return jax.tree.leaves(state.params)

    first, again, other = initial_params(1), initial_params(1), initial_params(2)
    for leaf, same_seed_leaf in zip(first, again):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(same_seed_leaf))
    assert any(not np.array_equal(np.asarray(leaf), np.asarray(other_seed_leaf))
               for leaf, other_seed_leaf in zip(first, other))


def test_logged_learning_rate_matches_update(corpus_file):
    # Without warmup the cosine decay over 4 steps gives each step a different rate. Adam's
    # first update of an entry is the learning rate times the sign of its gradient, because
    # m / sqrt(v) is g / |g| after one step (up to eps). D gets no weight decay, so its change
    # is that update alone.
    config = tiny_config(corpus_file, optimizer__warmup_steps=0, train__num_steps=4)
    state = initial_train_state(config)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 8, 17)), jnp.int32)

    new_state, metrics = jax.jit(train_step)(state, tokens)
    change = (np.asarray(new_state.params["blocks"][0]["mixer"]["D"])
              - np.asarray(state.params["blocks"][0]["mixer"]["D"]))

    logged = float(metrics["learning_rate"])
    np.testing.assert_allclose(np.abs(change), logged, rtol=1e-3)
    assert logged == pytest.approx(config.optimizer.learning_rate)  # The peak, without warmup.


def test_train_step_counts_steps_in_state_and_optimizer(corpus_file):
    state = initial_train_state(tiny_config(corpus_file), data_mesh())
    tokens = jnp.zeros((1, 8, 17), jnp.int32)
    for _ in range(3):
        state, _ = jax.jit(train_step)(state, tokens)
    assert int(state.step) == 3
    adam_state = state.opt_state[1][0]
    assert int(adam_state.count) == 3


# ---- end-to-end runs


@pytest.mark.parametrize("architecture", ["mamba", "transformer"])
def test_tiny_run_loss_falls(corpus_file, tmp_path, architecture):
    config = tiny_config(corpus_file, architecture, train__num_steps=30, optimizer__warmup_steps=5,
                         train__eval_every=15)
    train_and_evaluate(config, tmp_path)

    losses = train_losses(tmp_path)
    assert [record["step"] for record in read_metrics(tmp_path, "train")] == list(range(1, 31))
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    val = read_metrics(tmp_path, "val")
    assert [record["step"] for record in val] == [15, 30]
    assert val[-1]["bits_per_byte"] < val[0]["bits_per_byte"]
    assert val[-1]["bits_per_byte"] == pytest.approx(val[-1]["loss"] / math.log(2))
    assert list((tmp_path / "tensorboard").iterdir())


NUM_STEPS_INTERRUPTED = 80


@pytest.fixture(scope="module")
def interrupted_run(corpus_file, tmp_path_factory):
    """Start tiny training in `train.py`, send SIGTERM after its third step, wait for the exit."""
    workdir = tmp_path_factory.mktemp("interrupted")
    process = run_python([
        "train.py", "--config=configs/mamba_lm.py:tiny", f"--workdir={workdir}",
        f"--config.data.path={corpus_file}", "--config.data.val_fraction=0.1",
        f"--config.train.num_steps={NUM_STEPS_INTERRUPTED}", "--config.train.eval_every=1000",
        "--config.train.checkpoint_every=1000"])
    metrics_path = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics_path.is_file() and len(metrics_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    return workdir, process.returncode, output


def test_sigterm_saves_restorable_checkpoint(interrupted_run, corpus_file):
    workdir, returncode, output = interrupted_run
    assert returncode == 0, output
    assert "received SIGTERM" in output

    stopped_at = read_metrics(workdir, "train")[-1]["step"]
    assert 3 <= stopped_at < NUM_STEPS_INTERRUPTED
    model, config = load_run(workdir)
    assert config.train.num_steps == NUM_STEPS_INTERRUPTED
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 257)
    assert bool(jnp.all(jnp.isfinite(logits)))

    manager = checkpoint.checkpoint_manager(workdir, keep=3)
    assert manager.latest_step() == stopped_at
    manager.close()


def test_restored_state_matches_fresh_structure(interrupted_run):
    workdir, _, _ = interrupted_run
    config = checkpoint.load_config(workdir)
    fresh = initial_train_state(config, data_mesh())
    manager = checkpoint.checkpoint_manager(workdir, keep=3)
    restored = checkpoint.restore_checkpoint(manager, fresh)
    manager.close()

    assert jax.tree.structure(restored) == jax.tree.structure(fresh)
    assert tree_signature(restored) == tree_signature(fresh)
    assert int(restored.step) == read_metrics(workdir, "train")[-1]["step"]
    assert int(restored.opt_state[1][0].count) == int(restored.step)


def test_resume_matches_uninterrupted_run(interrupted_run, corpus_file, tmp_path):
    # Resume a copy, so that the other tests of the interrupted run see it as it was left.
    workdir = tmp_path / "resumed"
    shutil.copytree(interrupted_run[0], workdir)
    uninterrupted = tmp_path / "uninterrupted"
    config = tiny_config(corpus_file, train__num_steps=NUM_STEPS_INTERRUPTED,
                         train__eval_every=1000, train__checkpoint_every=1000)
    resumed = train_and_evaluate(config, workdir)
    train_and_evaluate(config, uninterrupted)

    steps = [record["step"] for record in read_metrics(workdir, "train")]
    assert steps == list(range(1, NUM_STEPS_INTERRUPTED + 1))
    with open(workdir / "metrics.jsonl") as lines:
        logged_steps = [json.loads(line)["step"] for line in lines
                        if json.loads(line)["split"] == "train"]
    assert logged_steps == steps  # no step was repeated or skipped across the interruption
    assert train_losses(workdir) == train_losses(uninterrupted)  # bit-identical floats
    assert int(resumed.step) == NUM_STEPS_INTERRUPTED
    assert int(resumed.opt_state[1][0].count) == NUM_STEPS_INTERRUPTED


FOUR_DEVICE_SCRIPT = """
import sys, jax
from tests.test_train import tiny_config
from training import train_and_evaluate
assert jax.device_count() == 4, jax.devices()
config = tiny_config(sys.argv[1], train__num_steps=6, train__eval_every=3)
train_and_evaluate(config, sys.argv[2])
"""


def test_four_devices_give_same_losses_as_one(corpus_file, tmp_path):
    four_device_dir = tmp_path / "four"
    process = run_python(["-c", FOUR_DEVICE_SCRIPT, str(corpus_file), str(four_device_dir)],
                         {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                          "JAX_PLATFORMS": "cpu"})
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output

    assert jax.device_count() == 1
    one_device_dir = tmp_path / "one"
    train_and_evaluate(tiny_config(corpus_file, train__num_steps=6, train__eval_every=3),
                       one_device_dir)

    np.testing.assert_allclose(train_losses(four_device_dir), train_losses(one_device_dir),
                               rtol=1e-5)
    four_val = [record["loss"] for record in read_metrics(four_device_dir, "val")]
    one_val = [record["loss"] for record in read_metrics(one_device_dir, "val")]
    np.testing.assert_allclose(four_val, one_val, rtol=1e-5)


# A run whose final wait for the asynchronous save is preceded by a signal to itself, as when a
# job is stopped in the last moments of a run. The signal is sent only from the run's final
# wait, in training.checkpoint.wait_for_saves.
SIGNAL_AT_LAST_SAVE_SCRIPT = """
import os, signal, sys
import orbax.checkpoint as ocp
from absl import logging
from tests.test_train import tiny_config
from training import train_and_evaluate
wait_until_finished = ocp.CheckpointManager.wait_until_finished
def signal_then_wait(manager):
    if sys._getframe(1).f_code.co_name == "wait_for_saves":
        os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    return wait_until_finished(manager)
ocp.CheckpointManager.wait_until_finished = signal_then_wait
logging.set_verbosity(logging.INFO)
train_and_evaluate(tiny_config(sys.argv[1], train__num_steps=3), sys.argv[2])
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_during_last_save_keeps_it(corpus_file, tmp_path, signal_name):
    workdir = tmp_path / "run"
    process = run_python(["-c", SIGNAL_AT_LAST_SAVE_SCRIPT, str(corpus_file), str(workdir),
                          signal_name])
    output, _ = process.communicate(timeout=240)

    assert process.returncode == 0, output
    assert f"received {signal_name}: saved the checkpoint of step 3 and stopped" in output
    manager = checkpoint.checkpoint_manager(workdir, keep=3)
    assert manager.latest_step() == 3
    manager.close()
    model, _ = load_run(workdir)
    assert bool(jnp.all(jnp.isfinite(model(jnp.zeros((1, 4), jnp.int32)))))


# ---- bad input


@pytest.fixture(scope="module")
def trained_workdir(corpus_file, tmp_path_factory) -> Path:
    """A workdir holding the checkpoint of a finished 4-step run; tests must leave it unchanged."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train_and_evaluate(tiny_config(corpus_file, train__num_steps=4), workdir)
    return workdir


def bad_input_cases(corpus_file: Path, tmp_path: Path) -> list[tuple[str, dict, str]]:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    short_file = tmp_path / "short.txt"
    short_file.write_text("print(1)\n" * 3)
    binary_file = tmp_path / "weights.txt"
    binary_file.write_bytes(bytes(range(256)) * 4)
    return [
        ("missing corpus", {"data__path": str(tmp_path / "absent")}, "does not exist"),
        ("empty corpus folder", {"data__path": str(empty_dir)}, str(empty_dir)),
        ("corpus shorter than a window", {"data__path": str(short_file)}, "window"),
        ("binary file", {"data__path": str(binary_file)}, "not a text file"),
        ("zero seq_len", {"data__seq_len": 0}, "data.seq_len=0"),
        ("negative batch_size", {"data__batch_size": -4}, "data.batch_size=-4"),
        ("batch not divisible", {"optimizer__accumulation_steps": 3}, "data.batch_size=8"),
        ("vocabulary smaller than the bytes", {"model__vocab_size": 100},
         "model.vocab_size=100; allowed: an integer >= 257"),
        ("negative seed", {"train__seed": -1}, "train.seed=-1"),
        ("cache_dir is a file", {"data__cache_dir": str(short_file)}, "data.cache_dir="),
    ]


def test_bad_input_raises_clear_error_and_keeps_checkpoint(corpus_file, tmp_path,
                                                           trained_workdir):
    before = checkpoint_listing(trained_workdir)
    for name, overrides, message in bad_input_cases(corpus_file, tmp_path):
        config = tiny_config(corpus_file, train__num_steps=8, **overrides)
        with pytest.raises(ValueError, match=message):
            train_and_evaluate(config, trained_workdir)
        assert checkpoint_listing(trained_workdir) == before, name


def test_batch_not_divisible_over_devices_names_device_count(corpus_file):
    config = tiny_config(corpus_file)
    with pytest.raises(ValueError, match=r"data.batch_size=8.*devices \(3\)"):
        validate_config(config, num_devices=3)


def test_empty_workdir_is_rejected(corpus_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir is empty"):
        train_and_evaluate(tiny_config(corpus_file), "")
    assert list(tmp_path.iterdir()) == []


def test_workdir_that_is_a_file_is_named(corpus_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train_and_evaluate(tiny_config(corpus_file), blocker)


@pytest.mark.parametrize("name, make_folder", [("checkpoints", False), ("tensorboard", False),
                                              ("metrics.jsonl", True), ("run.lock", True),
                                              ("config.json", True)])
def test_workdir_entry_of_wrong_kind(corpus_file, tmp_path, name, make_folder):
    # A file where the run keeps a folder, or a folder where it keeps a file.
    workdir = tmp_path / "run"
    workdir.mkdir()
    if make_folder:
        (workdir / name).mkdir()
    else:
        (workdir / name).write_text("")
    found, expected = ("folder", "file") if make_folder else ("file", "folder")

    with pytest.raises(ValueError, match=rf"{re.escape(str(workdir / name))} is a {found}, but "
                                         rf"a run keeps a {expected} of that name there"):
        train_and_evaluate(tiny_config(corpus_file), workdir)
    assert sorted(path.name for path in workdir.iterdir()) == [name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a folder without write access")
def test_unwritable_checkpoint_folder_named(corpus_file, tmp_path):
    workdir = tmp_path / "run"
    (workdir / checkpoint.CHECKPOINT_DIR).mkdir(parents=True)
    (workdir / checkpoint.CHECKPOINT_DIR).chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"checkpoints is not writable"):
            train_and_evaluate(tiny_config(corpus_file), workdir)
    finally:
        (workdir / checkpoint.CHECKPOINT_DIR).chmod(0o755)


def test_unwritable_workdir_raises_clear_error(corpus_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="is not writable"):
        train_and_evaluate(tiny_config(corpus_file), blocker / "run")


def test_resume_with_other_model_names_differing_fields(corpus_file, trained_workdir):
    before = checkpoint_listing(trained_workdir)
    config = tiny_config(corpus_file, train__num_steps=8, model__d_state=8, model__num_layers=3)
    with pytest.raises(ValueError, match=r"d_state: 4 -> 8; num_layers: 2 -> 3"):
        train_and_evaluate(config, trained_workdir)
    assert checkpoint_listing(trained_workdir) == before


def test_resume_with_other_scan_implementation(corpus_file, trained_workdir, tmp_path):
    # The scan implementation decides how the model computes, not what it is.
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    assert checkpoint.load_config(workdir).model.scan == "cpu_kernel"
    config = tiny_config(corpus_file, train__num_steps=6, model__scan="sequential")

    state = train_and_evaluate(config, workdir)

    assert int(state.step) == 6
    assert [record["step"] for record in read_metrics(workdir, "train")] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.load_config(workdir).model.scan == "sequential"


def test_resume_with_other_data_sizes(corpus_file, trained_workdir, tmp_path):
    # A resumed run may change the data and train sections (a longer length, another batch
    # size, more steps). Only the model section has to match.
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    lines_before = len((workdir / "metrics.jsonl").read_text().splitlines())
    config = tiny_config(corpus_file, train__num_steps=6, data__seq_len=64, data__batch_size=4)

    state = train_and_evaluate(config, workdir)

    new_records = [json.loads(line) for line in
                   (workdir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    assert [r["step"] for r in new_records if r["split"] == "train"] == [5, 6]
    assert int(state.step) == 6
    assert checkpoint.load_config(workdir).data.seq_len == 64


def test_resume_rejects_other_frozen_parameters(corpus_file, trained_workdir, tmp_path):
    # Freezing parameters changes the structure of the optimizer state in the checkpoints.
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    config = tiny_config(corpus_file, train__num_steps=6,
                         optimizer__frozen_parameters="^embedding/")

    with pytest.raises(ValueError, match=r"optimizer state has another structure.*"
                                         r"frozen_parameters: '' -> '\^embedding/'.*"
                                         r"Resume with the saved values"):
        train_and_evaluate(config, workdir)
    assert checkpoint.load_config(workdir).optimizer.frozen_parameters == ""
    assert read_metrics(workdir, "train")[-1]["step"] == 4


def test_resumed_tokens_count_from_zero(corpus_file, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    config = tiny_config(corpus_file, train__num_steps=6)

    train_and_evaluate(config, workdir)

    records = read_metrics(workdir, "train")
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    tokens_per_step = config.data.batch_size * config.data.seq_len
    for record in records:
        assert record["tokens"] == record["step"] * tokens_per_step, record


def test_run_keeps_last_checkpoints(corpus_file, tmp_path):
    config = tiny_config(corpus_file, train__num_steps=4, train__checkpoint_every=1,
                         train__keep_checkpoints=2)
    train_and_evaluate(config, tmp_path)

    steps = sorted(int(path.name) for path in (tmp_path / checkpoint.CHECKPOINT_DIR).iterdir()
                   if path.name.isdigit())
    assert steps == [3, 4]


def test_load_run_returns_saved_parameters(trained_workdir):
    # Read the last checkpoint with orbax alone, without the template that load_run builds.
    checkpoint_dir = trained_workdir / checkpoint.CHECKPOINT_DIR
    last_step = max(int(path.name) for path in checkpoint_dir.iterdir() if path.name.isdigit())
    saved = flat_params(ocp.StandardCheckpointer().restore(
        checkpoint_dir.absolute() / str(last_step) / "state")["params"])

    model, config = load_run(trained_workdir)
    loaded = flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    fresh_model = build_model(config.model, rngs=nnx.Rngs(config.train.seed))
    fresh = flat_params(nnx.to_pure_dict(nnx.state(fresh_model, nnx.Param)))

    assert last_step == config.train.num_steps
    assert loaded.keys() == saved.keys()
    for path, saved_leaf in saved.items():
        np.testing.assert_array_equal(loaded[path], saved_leaf, err_msg=path)
    assert not np.array_equal(saved["embedding/embedding"], fresh["embedding/embedding"])


def test_finished_run_has_nothing_to_do(corpus_file, trained_workdir, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    checkpoints_before = checkpoint_listing(workdir)
    metrics_before = (workdir / "metrics.jsonl").read_text()
    caplog.set_level(logging.INFO, logger="absl")

    state = train_and_evaluate(tiny_config(corpus_file, train__num_steps=4), workdir)

    assert int(state.step) == 4
    assert (workdir / "metrics.jsonl").read_text() == metrics_before
    assert checkpoint_listing(workdir) == checkpoints_before
    assert "nothing to do: the checkpoint is at step 4 of train.num_steps=4" in caplog.messages


def test_load_run_old_config_gets_defaults(trained_workdir, tmp_path):
    # A config.json written before the late phase existed still loads, with the defaults that
    # reproduce the old behaviour.
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    for name in ("late_phase_step", "late_phase_learning_rate"):
        del saved["optimizer"][name]
    (workdir / "config.json").write_text(json.dumps(saved))

    model, config = load_run(workdir)
    reference, _ = load_run(trained_workdir)

    assert config.optimizer.late_phase_step == 0
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


# Orbax leaves callbacks of the failed read on its closed event loop; Python reports them when
# they are collected. They come from orbax's clean-up, not from the error this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_checkpoint_names_earlier_step(corpus_file, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config(corpus_file, train__num_steps=4, train__checkpoint_every=2),
                       workdir)
    steps = sorted(int(path.name) for path in (workdir / checkpoint.CHECKPOINT_DIR).iterdir()
                   if path.name.isdigit())
    latest, earlier = steps[-1], steps[-2]
    data_files = [path for path in (workdir / checkpoint.CHECKPOINT_DIR / str(latest)).rglob("*")
                  if path.is_file() and path.parent.name == "d"]
    assert data_files
    for path in data_files:
        path.write_bytes(b"\0" * 100)
    before = checkpoint_listing(workdir)
    message = (rf"failed to read the checkpoint of step {latest} in .*{latest} \(.*\); move that "
               rf"folder out of the workdir to resume from step {earlier}")

    with pytest.raises(ValueError, match=message) as raised:
        train_and_evaluate(tiny_config(corpus_file, train__num_steps=8), workdir)
    assert "tensorstore_spec" not in str(raised.value)  # The reason, without TensorStore's spec.
    with pytest.raises(ValueError, match=message):
        load_run(workdir)
    missing = rf"no checkpoint of step 3 .*saved steps: {earlier}, {latest}"
    with pytest.raises(ValueError, match=missing):
        load_run(workdir, step=3)
    assert checkpoint_listing(workdir) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_failed_save_names_kept_checkpoint(corpus_file, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    before = checkpoint_listing(workdir)
    config = tiny_config(corpus_file, train__num_steps=8)
    # A file size limit fails the write of the checkpoint data (about 200 KB), as a full disk
    # does, and leaves the small metrics and TensorBoard files alone.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
    try:
        with pytest.raises(ValueError) as raised:
            train_and_evaluate(config, workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    message = str(raised.value)
    assert message.startswith(f"failed to save a checkpoint in {workdir / 'checkpoints'} (")
    assert message.endswith("); the checkpoint of step 4 is complete and kept. Fix the cause and "
                            "run the same command to resume.")
    assert "\n" not in message
    assert {path: time for path, time in checkpoint_listing(workdir).items()
            if path.startswith("4")} == before
    assert int(train_and_evaluate(config, workdir).step) == 8


def library_record(pathname: str, level: int, error: Exception | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, error.__traceback__) if error is not None else None
    return logging.LogRecord("absl", level, pathname, 1, "save of %s failed", ("step 20",),
                             exc_info)


def test_library_errors_shortened_to_one_line():
    try:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing\nsecond line")
    except ValueError as error:
        raised = error
    quiet = QuietLibraries()
    formatter = logging.Formatter("%(message)s")

    orbax_error = library_record("/venv/orbax/checkpoint/manager.py", logging.ERROR, raised)
    assert quiet.filter(orbax_error)
    assert formatter.format(orbax_error) == ("save of step 20 failed (ValueError: "
                                             "RESOURCE_EXHAUSTED: Error writing)")

    own_error = library_record("/repo/training/loop.py", logging.ERROR, raised)
    assert quiet.filter(own_error)
    assert "Traceback" in formatter.format(own_error)

    assert not quiet.filter(library_record("/venv/jax/_src/x.py", logging.INFO))
    assert quiet.filter(library_record("/venv/jax/_src/x.py", logging.WARNING))
    assert quiet.filter(library_record("/repo/training/loop.py", logging.INFO))


def test_workdir_in_use_is_rejected(corpus_file, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    before = checkpoint_listing(workdir)
    config = tiny_config(corpus_file, train__num_steps=6)

    with checkpoint.workdir_lock(workdir):  # What a run training in this workdir holds.
        with pytest.raises(ValueError, match=rf"in use by another training run \(process "
                                             rf"{os.getpid()} holds .*run.lock\)"):
            train_and_evaluate(config, workdir)
        assert checkpoint_listing(workdir) == before

    state = train_and_evaluate(config, workdir)  # The lock is free again.
    assert int(state.step) == 6


def test_resume_without_saved_config_rejected(corpus_file, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    (workdir / checkpoint.CONFIG_FILE).unlink()
    before = checkpoint_listing(workdir)
    config = tiny_config(corpus_file, train__num_steps=6)
    message = r"contains checkpoints but no config.json.*Restore the file"
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, workdir)
    assert checkpoint_listing(workdir) == before
    assert not (workdir / checkpoint.CONFIG_FILE).exists()


def test_non_finite_update_keeps_last_checkpoint(corpus_file, trained_workdir):
    before = checkpoint_listing(trained_workdir)
    # A finite learning rate so large that the first update overflows the parameters.
    config = tiny_config(corpus_file, train__num_steps=8, train__checkpoint_every=1,
                         optimizer__learning_rate=1e38, optimizer__warmup_steps=0)
    saved_config = (trained_workdir / checkpoint.CONFIG_FILE).read_text()
    with pytest.raises(TrainingDivergedError, match="at step 5"):
        train_and_evaluate(config, trained_workdir)
    assert checkpoint_listing(trained_workdir) == before
    assert (trained_workdir / checkpoint.CONFIG_FILE).read_text() == saved_config


def test_command_line_reports_bad_input_without_traceback(tmp_path):
    cases = [
        (["--config=configs/mamba_lm.py:huge"], "unknown config variant 'huge'"),
        (["--config=configs/mamba_lm.py:tiny", "--config.train.nmu_steps=5"],
         "unknown config field 'train.nmu_steps'.*num_steps"),
        (["--config=configs/mamba_lm.py:tiny", "--config.data.seq_len=0"],
         r"data.seq_len=0; allowed: an integer > 0"),
        (["--config=configs/mamba_lm.py:tiny", "extra"], "unexpected arguments: extra"),
        (["--config=README.md"], r"config file 'README.md' is not a Python file"),
        (["--config=configs/mamba_lm.py:tiny", "--config.model.d_model=0"],
         r"model.d_model must be an integer >= 1, got 0$"),
        (["--config=configs/mamba_lm.py:tiny", "--config.model.selective=maybe"],
         r"flag --config.model.selective=maybe: expected true or false, got 'maybe'$"),
        (["--config=configs/mamba_lm.py:tiny", "--config.train.num_steps=1.5"],
         r"flag --config.train.num_steps=1.5: expected an integer, got '1.5'$"),
        (["--config=configs/mamba_lm.py:tiny", "--config.optimizer.learning_rate=fast"],
         r"flag --config.optimizer.learning_rate=fast: expected a number, got 'fast'$"),
        (["--config=configs/mamba_lm.py:tiny", "--keep_host_memory=maybe"],
         r"flag --keep_host_memory=maybe: expected true or false, got 'maybe'$"),
    ]
    for flags, message in cases:
        process = run_python(["train.py", *flags, f"--workdir={tmp_path / 'run'}"])
        output, _ = process.communicate(timeout=120)
        assert process.returncode != 0, flags
        assert "Traceback" not in output, output
        assert any(re.search(message, line) for line in output.splitlines()), output
    assert not (tmp_path / "run" / checkpoint.CHECKPOINT_DIR).exists()


def test_bfloat16_compute_keeps_float32_parameters(corpus_file):
    config = tiny_config(corpus_file, model__dtype="bfloat16")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    state = create_train_state(model, optax.sgd(0.1), lambda step: 0.1)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}


def test_plot_writes_image_and_summary(trained_workdir, tmp_path, capsys):
    from training import plot  # noqa: PLC0415 (matplotlib is only needed here)

    image = tmp_path / "curves.png"
    assert plot.main([str(trained_workdir), "--out", str(image)]) == 0
    assert image.stat().st_size > 0
    summary_row = capsys.readouterr().out.splitlines()[1].split()
    assert summary_row[0] == trained_workdir.name
    assert int(summary_row[1]) == read_metrics(trained_workdir, "train")[-1]["step"]
    expected_bits = read_metrics(trained_workdir, "val")[-1]["bits_per_byte"]
    assert float(summary_row[2]) == pytest.approx(expected_bits, abs=1e-3)


def test_plot_reports_unwritable_out_and_cut_record(trained_workdir, tmp_path, capsys):
    from training import plot  # noqa: PLC0415 (matplotlib is only needed here)

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        plot.main([str(trained_workdir), "--out", str(a_file / "c.png")])
    assert "is under the file" in capsys.readouterr().err

    cut_run = tmp_path / "cut"
    shutil.copytree(trained_workdir, cut_run)
    with open(cut_run / "metrics.jsonl", "a", encoding="utf-8") as metrics_file:
        metrics_file.write('{"step": 9, "split": "tr')
    assert plot.main([str(cut_run), "--out", str(tmp_path / "c.png")]) == 1
    assert "metrics.jsonl:" in capsys.readouterr().err


def test_read_metrics_keeps_last_record(tmp_path):
    # A run that crashed after step 3 without a checkpoint there logs steps 2 and 3 again when
    # it resumes from step 1. The later records are those of the run that went on.
    records = [{"step": 1, "split": "train", "loss": 5.0},
               {"step": 2, "split": "train", "loss": 4.0},
               {"step": 3, "split": "train", "loss": 3.0},
               {"step": 2, "split": "val", "loss": 9.0},
               {"step": 2, "split": "train", "loss": 4.5},
               {"step": 3, "split": "train", "loss": 3.5}]
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (tmp_path / "metrics.jsonl").write_text(lines)

    train = read_metrics(tmp_path, "train")
    assert [(record["step"], record["loss"]) for record in train] == [(1, 5.0), (2, 4.5), (3, 3.5)]
    assert [record["loss"] for record in read_metrics(tmp_path, "val")] == [9.0]


def test_moving_average_of_known_values():
    from training.plot import moving_average  # noqa: PLC0415

    averaged = moving_average(np.array([1.0, 3.0, 5.0, 7.0]), window=2)
    np.testing.assert_allclose(averaged, [1.0, 2.0, 4.0, 6.0])


def test_readme_training_snippet(monkeypatch):
    # The README's notebook snippet, run as written: 20 steps must take the loss well below
    # ln(257) = 5.55 nats, the loss of a model that predicts all 257 ids equally.
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    snippet = next(block for block in blocks if "training.initial_train_state" in block)
    monkeypatch.chdir(REPO)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert int(namespace["state"].step) == 20
    assert float(namespace["metrics"]["loss"]) < 5.0
    assert isinstance(namespace["model"], nnx.Module)


def test_resume_drops_cut_metrics_line(corpus_file, tmp_path):
    # A run killed while it writes a record leaves a last line without its newline. The resumed
    # run must not glue its first record onto it.
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config(corpus_file, train__num_steps=4), workdir)
    metrics_file = workdir / "metrics.jsonl"
    complete = metrics_file.read_bytes()
    metrics_file.write_bytes(complete[:-10])
    kept = complete[:complete[:-10].rfind(b"\n") + 1]

    train_and_evaluate(tiny_config(corpus_file, train__num_steps=6), workdir)
    assert metrics_file.read_bytes().startswith(kept)
    lines = metrics_file.read_text().splitlines()
    assert all(json.loads(line)["step"] >= 1 for line in lines)
    assert [record["step"] for record in read_metrics(workdir, "train")][-1] == 6


def test_dt_rank_override_from_command_line(corpus_file):
    # `--config.model.dt_rank=3` arrives as the string "3", since the field's default is "auto".
    config = tiny_config(corpus_file, model__dt_rank="3")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    d_state = config.model.d_state
    assert model.blocks[0].mixer.x_proj.kernel.shape[1] == 3 + 2 * d_state
    assert model.blocks[0].mixer.dt_proj.kernel.shape[0] == 3


@pytest.mark.parametrize("pattern, problem", [("nomatch", "matches no parameter"),
                                              (".*", "matches every parameter")])
def test_frozen_pattern_matching_none_or_all(corpus_file, tmp_path, pattern, problem):
    config = tiny_config(corpus_file, optimizer__frozen_parameters=pattern)
    with pytest.raises(ValueError, match=rf"frozen_parameters='{re.escape(pattern)}': .*"
                                         rf"{problem}.*embedding"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / checkpoint.CHECKPOINT_DIR).exists()


def test_ctrl_c_while_starting(tmp_path):
    # The run takes its workdir lock, then loads the standard library corpus for a few seconds
    # before the training loop (which turns Ctrl-C into a checkpoint) starts.
    workdir = tmp_path / "run"
    process = run_python(["train.py", "--config=configs/mamba_lm.py:tiny",
                          f"--workdir={workdir}"])
    deadline = time.monotonic() + 120
    while not (workdir / "run.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 130, output
    assert "Traceback" not in output, output
    assert "interrupted while starting, before the first training step" in output
    assert not any((workdir / checkpoint.CHECKPOINT_DIR).glob("[0-9]*"))


# A Ctrl-C that arrives inside a garbage-collection callback while the run starts: Python
# ignores the KeyboardInterrupt raised there.
CTRL_C_IN_GC_SCRIPT = """
import gc, signal, sys
import training.loop as loop
from tests.test_train import tiny_config
start_run = loop._start_run
def interrupt_in_gc(phase, info):
    gc.callbacks.remove(interrupt_in_gc)
    signal.raise_signal(signal.SIGINT)
def start_with_lost_interrupt(*args):
    gc.callbacks.append(interrupt_in_gc)
    gc.collect()
    return start_run(*args)
loop._start_run = start_with_lost_interrupt
try:
    loop.train_and_evaluate(tiny_config(sys.argv[1], train__num_steps=3), sys.argv[2])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_lost_in_gc_stops(corpus_file, tmp_path):
    workdir = tmp_path / "run"
    process = run_python(["-c", CTRL_C_IN_GC_SCRIPT, str(corpus_file), str(workdir)])
    output, _ = process.communicate(timeout=240)

    assert process.returncode == 130, output
    metrics = workdir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    assert not any((workdir / checkpoint.CHECKPOINT_DIR).glob("[0-9]*"))


@pytest.mark.parametrize("section, value, found", [
    ("model", None, "no section 'model'"), ("optimizer", None, "no section 'optimizer'"),
    ("model", 5, "a JSON int as section 'model'"), ("optimizer", "x", "a JSON str as section"),
])
def test_saved_config_without_section_named(corpus_file, trained_workdir, tmp_path, section,
                                            value, found):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    saved = json.loads((workdir / checkpoint.CONFIG_FILE).read_text())
    if value is None:
        del saved[section]
    else:
        saved[section] = value
    (workdir / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
    before = checkpoint_listing(workdir)
    message = rf"{re.escape(str(workdir / checkpoint.CONFIG_FILE))} has {found}.*Restore it"

    with pytest.raises(ValueError, match=message):
        load_run(workdir)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(corpus_file, train__num_steps=6), workdir)
    assert checkpoint_listing(workdir) == before


@pytest.mark.parametrize("content", ["{'step': 1", "[1, 2]", "\udcff"])
def test_corrupt_saved_config_names_the_file(tmp_path, content):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / checkpoint.CONFIG_FILE).write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(workdir / checkpoint.CONFIG_FILE))} "
                                         r"(is not a readable JSON|contains a JSON list)"):
        load_run(workdir)
