"""Tests of the synthetic-task experiments: configs, masked loss, extrapolation and probes.

Every model here is a `tiny` variant (width 16, sequences of at most 64 tokens), so each training
run takes seconds.
"""

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import birth, extrapolate
from models.registry import build_model
from training import load_run, plot, train_and_evaluate
from training.freezing import frozen_labels
from training.optimizer import build_optimizer, learning_rate_schedule
from training.steps import create_train_state, train_step
from training.tasks import (TaskData, masked_accuracy, masked_eval_step, masked_loss,
                            synthetic_task_config)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_CONFIGS = ["induction_heads", "selective_copying", "associative_recall",
                      "birth_transformer"]


def load_config(name: str, variant: str = "tiny"):
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(variant)


# One case per distinct model or optimizer structure runs by default. The other variants only
# change sizes, so they compile the same programs again and are marked slow.
DEFAULT_CASES = {("induction_heads", "mamba"), ("induction_heads", "transformer"),
                 ("selective_copying", "nonselective"), ("birth_transformer", "attention_only"),
                 ("birth_transformer", "frozen_embeddings"),
                 ("birth_transformer", "frozen_first_layer"), ("birth_transformer", "simplified")}


def variant_cases():
    cases = []
    for name in EXPERIMENT_CONFIGS:
        module, _ = load_config(name)
        for variant in module.VARIANTS:
            # "paper" sets the sizes that "tiny" sets, so the two do not combine;
            # tests/test_train.py builds and validates it alone.
            if variant in ("", "tiny", "paper"):
                continue
            marks = () if (name, variant) in DEFAULT_CASES else (pytest.mark.slow,)
            cases.append(pytest.param(name, variant, marks=marks, id=f"{name}-{variant}"))
    return cases


def fresh_state(config):
    model = build_model(config.model, rngs=nnx.Rngs(config.train.seed))
    num_steps = config.train.num_steps
    return create_train_state(model, build_optimizer(config.optimizer, num_steps),
                              learning_rate_schedule(config.optimizer, num_steps))


@pytest.mark.parametrize("name,variant", variant_cases())
def test_variant_trains_with_finite_loss_and_valid_accuracy(name, variant):
    _, config = load_config(name, f"{variant},tiny")
    source = TaskData(config)
    state = fresh_state(config)
    initial_params = jax.tree.map(np.asarray, state.params)
    step_fn = jax.jit(functools.partial(train_step, loss_fn=source.loss_fn))

    for step in range(2):
        batch = source.train_batch(config.train.seed, step, 0, config.data.batch_size)
        state, metrics = step_fn(state, jax.tree.map(lambda rows: rows[None], batch))
        assert math.isfinite(float(metrics["loss"])), (name, variant, step)
    sums = jax.jit(masked_eval_step)(state, source.validation_batches(1)[0])
    accuracy = float(sums["correct_count"] / sums["token_count"])
    assert 0.0 <= accuracy <= 1.0

    pattern = config.optimizer.frozen_parameters
    if pattern:
        labels = frozen_labels(state.params, pattern)
        frozen = [(before, after) for label, before, after in zip(
            jax.tree.leaves(labels), jax.tree.leaves(initial_params), jax.tree.leaves(state.params))
            if label == "frozen"]
        assert frozen, pattern
        for before, after in frozen:
            np.testing.assert_array_equal(before, np.asarray(after))


def test_variant_changes_what_it_names():
    assert load_config("induction_heads", "transformer,tiny")[1].model.architecture == "transformer"
    assert load_config("induction_heads", "nonselective,tiny")[1].model.selective is False
    assert load_config("birth_transformer", "tiny")[1].model.architecture == "transformer"
    assert load_config("birth_transformer", "mamba,tiny")[1].model.architecture == "mamba"
    _, attention_only = load_config("birth_transformer", "attention_only,tiny")
    assert attention_only.model.attention_only
    params = fresh_state(attention_only).params
    assert "feed_forward" not in params["blocks"][0]
    assert "feed_forward" in fresh_state(load_config("birth_transformer")[1]).params["blocks"][0]


def test_simplified_variant_trained_parameters():
    _, config = load_config("birth_transformer", "simplified,tiny")
    params = fresh_state(config).params
    labels = frozen_labels(params, config.optimizer.frozen_parameters)
    trained = {"/".join(str(key.key) for key in path[:-1])
               for path, label in jax.tree_util.tree_leaves_with_path(labels)
               if label != "frozen" and "norm" not in str(path)}
    assert trained == {"blocks/0/attention/query_proj", "blocks/0/attention/key_proj",
                       "blocks/1/attention/query_proj", "blocks/1/attention/key_proj",
                       "blocks/1/attention/out_proj"}
    assert config.model.attention_only


def test_nonselective_transformer_variant_names_field():
    with pytest.raises(ValueError, match="variant 'nonselective' does not apply to the "
                                         "transformer model: .*model.selective"):
        load_config("induction_heads", "transformer,nonselective")


# (config, variant, message): two named variants that set one field to different values.
CONFLICTING_VARIANTS = [
    ("induction_heads", "tiny,paper",
     "config variants 'tiny' and 'paper' set data.seq_len to different values, 32 and 256; "
     "allowed: one of the two variants, and --config.data.seq_len=VALUE to set the field"),
    ("induction_heads", "paper,transformer,tiny",
     "config variants 'paper' and 'tiny' set data.seq_len to different values, 256 and 32"),
    ("birth_transformer", "tiny,frozen_embeddings,frozen_first_layer",
     "config variants 'frozen_embeddings' and 'frozen_first_layer' set "
     "optimizer.frozen_parameters to different values, '^(embedding|head)/' and '^blocks/0/'"),
    ("associative_recall", "tiny,paper", "config variants 'tiny' and 'paper' set model.d_model "
     "to different values, 16 and 128"),
]


@pytest.mark.parametrize("name, variant, message", CONFLICTING_VARIANTS,
                         ids=[f"{name}:{variant}" for name, variant, _ in CONFLICTING_VARIANTS])
def test_conflicting_variants_rejected(name, variant, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(name, variant)


def test_architecture_overrides_conflict_for_that_architecture():
    # "a" and "b" differ only in an override nested under "mamba".
    variants = {"": {}, "mamba": {}, "transformer": {},
                "a": {"mamba": {"model.scan": "sequential"}, "model.d_model": 16},
                "b": {"mamba": {"model.scan": "chunked"}, "model.d_model": 16}}
    with pytest.raises(ValueError, match=re.escape(
            "config variants 'a' and 'b' set model.scan to different values, 'sequential' and "
            "'chunked'")):
        synthetic_task_config("induction_heads", {}, "a,b", variants)
    config = synthetic_task_config("induction_heads", {}, "transformer,a,b", variants)
    assert config.model.d_model == 16


def test_variants_override_base_variant():
    # The base variant "" sets data.seq_len to 256 and "tiny" to 32 without a conflict.
    assert load_config("induction_heads", "")[1].data.seq_len == 256
    assert load_config("induction_heads", "tiny")[1].data.seq_len == 32


# Variant combinations that the README and the config docstrings name.
DOCUMENTED_VARIANTS = [("induction_heads", "transformer,tiny"),
                       ("associative_recall", "transformer,tiny"),
                       ("selective_copying", "transformer,tiny"),
                       ("birth_transformer", "attention_only,frozen_embeddings")]


@pytest.mark.parametrize("name, variant", DOCUMENTED_VARIANTS)
def test_documented_variant_combination_loads(name, variant):
    module, config = load_config(name, variant)
    assert f"`:{variant}`" in module.__doc__
    for part in variant.split(","):
        for dotted, value in module.VARIANTS[part].items():
            if dotted not in ("mamba", "transformer"):
                field = functools.reduce(lambda section, key: section[key], dotted.split("."),
                                         config)
                assert field == value, (variant, dotted)


@pytest.mark.parametrize("variant", ["mamba,transformer,tiny", "transformer,mamba"])
def test_variant_with_both_architectures_rejected(variant):
    with pytest.raises(ValueError, match="names both architectures"):
        load_config("induction_heads", variant)


@pytest.mark.parametrize("name, default", [("induction_heads", "mamba"),
                                           ("birth_transformer", "transformer")])
def test_both_architectures_error_names_default(name, default):
    # The message names the variant as typed and the architecture that naming neither gives.
    with pytest.raises(ValueError, match=r"variant 'mamba,transformer' names both architectures "
                                         rf".*or neither for {default}$"):
        load_config(name, "mamba,transformer")
    assert load_config(name)[1].model.architecture == default


def test_synthetic_task_rejects_corpus_path():
    _, config = load_config("induction_heads", "tiny")
    config.data.path = "/nonexistent"
    with pytest.raises(ValueError, match=r"data.path='/nonexistent': the synthetic task "
                                         r"'induction_heads' generates its sequences"):
        TaskData(config)


def test_unknown_task_option_names_allowed_ones():
    _, config = load_config("induction_heads")
    config.unlock()
    config.data.task_options.num_trigers = 2
    with pytest.raises(ValueError, match="num_trigers.*allowed: vocab_size"):
        TaskData(config)


def test_num_triggers_above_vocabulary_raises():
    # Outputs are drawn from the non-trigger tokens, so a vocabulary of 16 (the tiny variant)
    # allows at most 15 triggers. The check runs when the data source is built.
    _, config = load_config("birth_transformer")
    config.data.task_options.num_triggers = 16
    with pytest.raises(ValueError,
                       match=r"data.task_options.num_triggers .*\[1, 15\], got 16"):
        TaskData(config)


def test_model_vocabulary_smaller_than_task_raises():
    _, config = load_config("induction_heads")
    config.unlock()
    config.model.vocab_size = 8
    with pytest.raises(ValueError, match="model.vocab_size=8.*>= 16"):
        TaskData(config)


def test_validation_batches_differ_from_training_batches():
    _, config = load_config("induction_heads")
    source = TaskData(config)
    validation = source.validation_batches(config.train.eval_batches)

    assert len(validation) == config.train.eval_batches
    for index, batch in enumerate(validation):
        training = source.train_batch(config.train.seed, index, 0, config.data.batch_size)
        # Every sequence differs from the training sequence in the same row.
        assert np.all(np.any(batch["inputs"] != training["inputs"], axis=1)), index


def test_masked_loss_ignores_targets_outside_mask():
    _, config = load_config("selective_copying")
    state = fresh_state(config)
    batch = TaskData(config).train_batch(0, 0, 0, 4)
    loss_sum, count = masked_loss(state.params, state, batch)
    assert float(count) == batch["loss_mask"].sum()

    outside = dict(batch, targets=np.where(batch["loss_mask"], batch["targets"],
                                           (batch["targets"] + 5) % 16))
    assert (outside["targets"] != batch["targets"]).any()
    outside_sum, _ = masked_loss(state.params, state, outside)
    assert float(outside_sum) == float(loss_sum)

    inside = dict(batch, targets=np.where(batch["loss_mask"], (batch["targets"] + 5) % 16,
                                          batch["targets"]))
    inside_sum, _ = masked_loss(state.params, state, inside)
    assert float(inside_sum) != float(loss_sum)


def test_eval_accuracy_compares_argmax_with_targets():
    _, config = load_config("selective_copying")
    state = fresh_state(config)
    batch = TaskData(config).train_batch(0, 0, 0, 4)
    predictions = np.asarray(jnp.argmax(state.model()(jnp.asarray(batch["inputs"])), axis=-1))
    # Targets: the model's prediction at every position except every other scored one, so the
    # accuracy is neither 0 nor 1 and a count outside the mask would show.
    mask = batch["loss_mask"]
    num_scored = int(mask.sum())
    scored_rows, scored_columns = np.nonzero(mask)
    missed = np.arange(len(scored_rows)) % 2 == 1
    targets = predictions.copy()
    targets[scored_rows[missed], scored_columns[missed]] = (
        predictions[scored_rows[missed], scored_columns[missed]] + 1) % config.model.vocab_size
    batch = dict(batch, targets=targets.astype(np.int32))

    sums = masked_eval_step(state, batch)
    expected_correct = int(np.sum((predictions == targets) & mask))
    assert expected_correct == num_scored - missed.sum()
    assert float(sums["token_count"]) == num_scored
    assert float(sums["correct_count"]) == expected_correct


@pytest.fixture(scope="module")
def trained_induction_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("induction")
    _, config = load_config("induction_heads")
    train_and_evaluate(config, workdir)
    return workdir


def test_task_run_logs_accuracy_in_unit_interval(trained_induction_run):
    records = [json.loads(line) for line in
               (trained_induction_run / "metrics.jsonl").read_text().splitlines()]
    validation = [record for record in records if record["split"] == "val"]
    assert [record["step"] for record in validation] == [2, 4]
    for record in validation:
        assert 0.0 <= record["accuracy"] <= 1.0
        assert math.isfinite(record["loss"])


def test_task_run_has_no_bits_per_byte(trained_induction_run, tmp_path, capsys):
    # Task tokens are not bytes: no bits per byte in the records, and training.plot rejects them.
    records = [json.loads(line) for line in
               (trained_induction_run / "metrics.jsonl").read_text().splitlines()]
    assert records
    assert all("bits_per_byte" not in record for record in records)

    assert plot.main([str(trained_induction_run), "--out", str(tmp_path / "curves.png")]) == 1
    captured = capsys.readouterr()
    assert "is a synthetic-task run" in captured.err
    assert "experiments.curves" in captured.err
    assert captured.out == ""
    assert not (tmp_path / "curves.png").exists()


def test_extrapolation_matches_direct_accuracy(trained_induction_run):
    model, config = load_run(trained_induction_run)
    lengths = [16, 64]
    results = extrapolate.evaluate_lengths(model, config, lengths, max_sequences=8,
                                           min_sequences=8, batch_size=8, chunk_len=16)
    source = TaskData(config)
    for length, result in zip(lengths, results, strict=True):
        batch = source.generate(0, 0, extrapolate.EXTRAPOLATION_STREAM, 8, seq_len=length)
        assert result["status"] == "ok"
        assert result["sequences"] == 8
        assert result["accuracy"] == masked_accuracy(model, batch), length


def test_extrapolate_output_without_library_logs(trained_induction_run,
                                                                  tmp_path):
    output_dir = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.extrapolate", f"--workdirs={trained_induction_run}",
         f"--output_dir={output_dir}", "--lengths=16,32", "--max_tokens=64", "--min_sequences=2",
         "--max_sequences=2", "--chunk_len=16"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "length 32:" in output
    # Restoring a checkpoint makes orbax log about 25 INFO lines; the command drops them.
    assert "orbax" not in output, output
    assert "checkpoint_manager" not in output, output
    assert json.loads((output_dir / "extrapolation.json").read_text())


def test_chunked_evaluation_counts_known_correct_positions():
    # Given targets equal to the model's own predictions at half of the scored positions,
    # when the 64-token batch is counted in chunks of 16,
    # then exactly that half is correct.
    _, config = load_config("selective_copying")
    model = build_model(config.model, rngs=nnx.Rngs(1))
    batch = TaskData(config).generate(0, 0, 0, 4, seq_len=64)
    predictions = np.asarray(jnp.argmax(model(jnp.asarray(batch["inputs"])), axis=-1))
    wrong = (predictions + 1) % config.model.vocab_size
    scored_rows, scored_columns = np.nonzero(batch["loss_mask"])
    keep = np.arange(len(scored_rows)) % 2 == 0
    targets = wrong.copy()
    targets[scored_rows[keep], scored_columns[keep]] = predictions[scored_rows[keep],
                                                                   scored_columns[keep]]
    batch = dict(batch, targets=targets.astype(np.int32))

    correct, scored = extrapolate.ModelEvaluator(model, chunk_len=16).counts(batch)
    assert scored == len(scored_rows)
    assert correct == keep.sum()


def test_chunked_evaluation_carries_state_across_chunks():
    # Every position is scored against the full forward pass's prediction, so a correct chunked
    # evaluation counts all of them. Positions whose top two logits are within 1e-3 are left
    # unscored, so that rounding differences between the two passes cannot flip a prediction.
    _, config = load_config("induction_heads")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (4, 64),
                                               dtype=np.int32)
    forward = nnx.jit(lambda model, tokens_bt: model(tokens_bt))
    logits = np.asarray(forward(model, tokens))
    top_two = np.sort(logits, axis=-1)[..., -2:]
    mask = top_two[..., 1] - top_two[..., 0] > 1e-3
    num_scored = int(mask.sum())
    batch = {"inputs": tokens, "targets": logits.argmax(axis=-1).astype(np.int32),
             "loss_mask": mask}

    # The test needs a model whose predictions depend on earlier chunks: chunks that each start
    # from an empty cache predict differently at some scored positions.
    @nnx.jit
    def prefill_from_empty_cache(model, tokens_bt):
        logits_btv, _ = model.prefill(tokens_bt, model.init_cache(*tokens_bt.shape))
        return logits_btv

    chunk_predictions = [
        np.asarray(prefill_from_empty_cache(model, tokens[:, start:start + 16])).argmax(axis=-1)
        for start in range(0, 64, 16)]
    changed = (np.concatenate(chunk_predictions, axis=1) != batch["targets"]) & mask
    assert changed.sum() > 10

    correct, scored = extrapolate.ModelEvaluator(model, chunk_len=16).counts(batch)
    assert scored == num_scored
    assert correct == num_scored


def test_extrapolation_sequences_are_distinct(monkeypatch):
    _, config = load_config("induction_heads", "tiny")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    evaluated = []
    counts = extrapolate.ModelEvaluator.counts

    def recording_counts(self, batch):
        evaluated.append(np.asarray(batch["inputs"]))
        return counts(self, batch)

    monkeypatch.setattr(extrapolate.ModelEvaluator, "counts", recording_counts)
    results = extrapolate.evaluate_lengths(model, config, [32], min_sequences=12,
                                           max_sequences=12, batch_size=4)

    assert results[0]["sequences"] == 12
    rows = np.concatenate(evaluated)
    assert len(rows) == 12
    assert len({row.tobytes() for row in rows}) == 12


def test_transformer_over_memory_budget_reports_out_of_memory():
    _, config = load_config("induction_heads", "transformer,tiny")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    results = extrapolate.evaluate_lengths(model, config, [32, 1024], max_sequences=4,
                                           batch_size=4, max_attention_gib=1e-4)
    assert results[0]["status"] == "ok"
    assert 0.0 <= results[0]["accuracy"] <= 1.0
    assert results[1]["status"] == extrapolate.OUT_OF_MEMORY
    assert results[1]["accuracy"] is None


def test_probe_logging_writes_expected_keys(tmp_path):
    _, config = load_config("birth_transformer")
    train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probed = [record for record in records if "probe/loss_in_context" in record]
    assert [record["step"] for record in probed] == [2, 4]

    expected = {"probe/loss_in_context", "probe/loss_global_bigram"}
    for layer in range(config.model.num_layers):
        for kind in ("previous_token", "induction", "memory_recall"):
            expected.add(f"probe/layer{layer}_head0_{kind}")
    assert expected <= set(probed[-1])
    for name in expected:
        assert math.isfinite(probed[-1][name]), name
        if not name.startswith("probe/loss"):
            assert 0.0 <= probed[-1][name] <= 1.0, name

    maps = np.load(tmp_path / birth.ATTENTION_MAP_DIR / "step_000004.npz")
    seq_len = config.data.seq_len
    for layer in range(config.model.num_layers):
        weights_hts = maps[f"layer{layer}"]
        assert weights_hts.shape == (config.model.num_heads, seq_len, seq_len)
        np.testing.assert_allclose(weights_hts.sum(axis=-1), 1.0, rtol=1e-4)
        assert np.allclose(np.triu(weights_hts, k=1), 0.0)


def test_mamba_probes_use_one_implicit_head_per_layer(tmp_path):
    _, config = load_config("birth_transformer", "mamba,tiny")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    metrics = birth.probe_metrics(model, TaskData(config), 0, tmp_path, is_writer=True)
    for layer in range(config.model.num_layers):
        assert 0.0 <= metrics[f"probe/layer{layer}_head0_induction"] <= 1.0
        assert f"probe/layer{layer}_head1_induction" not in metrics
        assert f"probe/layer{layer}_head0_memory_recall" not in metrics
    maps = np.load(tmp_path / birth.ATTENTION_MAP_DIR / "step_000000.npz")
    np.testing.assert_allclose(maps["layer0"].sum(axis=-1), 1.0, rtol=1e-4)


def test_previous_token_probe_after_triggers(tmp_path, monkeypatch):
    # A head that attends to the previous token only right after a trigger, and to itself
    # elsewhere, is a complete previous-token head in the sense of Bietti et al.
    _, config = load_config("birth_transformer", "tiny")
    source = TaskData(config)
    batch = birth.probe_batch(source)
    triggers = set(np.unique(batch["inputs"][~batch["global_bigram_mask"]]))
    tokens_bt = batch["inputs"][:birth.MAP_BATCH_SIZE]
    seq_len = tokens_bt.shape[1]
    weights_bhts = np.zeros((len(tokens_bt), 1, seq_len, seq_len))
    for b, tokens in enumerate(tokens_bt):
        for t in range(seq_len):
            after_trigger = t >= 1 and tokens[t - 1] in triggers
            weights_bhts[b, 0, t, t - 1 if after_trigger else t] = 1.0
    monkeypatch.setattr(birth, "attention_maps", lambda model, tokens: [weights_bhts] * 2)

    model = build_model(config.model, rngs=nnx.Rngs(0))
    metrics = birth.probe_metrics(model, source, 0, tmp_path, is_writer=False)
    assert metrics["probe/layer0_head0_previous_token"] == 1.0
    assert metrics["probe/layer1_head0_previous_token"] == 1.0


def test_memory_recall_applies_attention_norm():
    # W_V = W_O = identity and one-hot embeddings make W_O W_V recall every token, unless the
    # attention norm's scale of -1 turns each input e_k into -e_k before the head reads it.
    _, config = load_config("birth_transformer", "tiny")
    model = build_model(config.model, rngs=nnx.Rngs(0))
    vocab_size, d_model = config.model.vocab_size, config.model.d_model
    assert vocab_size == d_model
    assert config.model.num_heads == 1
    identity = jnp.eye(d_model)
    model.embedding.embedding[...] = identity
    model.head.kernel[...] = identity
    block = model.blocks[0]
    block.attention.value_proj.kernel[...] = identity
    block.attention.out_proj.kernel[...] = identity

    assert birth.head_memory_recall(model, 0, vocab_size) == [1.0]
    block.attention_norm.scale[...] = -jnp.ones(d_model)
    assert birth.head_memory_recall(model, 0, vocab_size) == [0.0]


def test_frozen_pattern_matches_anywhere_in_path():
    params = {"embedding": {"embedding": np.zeros(2)},
              "blocks": [{"attention": {"value_proj": {"kernel": np.zeros(2)},
                                        "key_proj": {"kernel": np.zeros(2)}}}]}
    labels = frozen_labels(params, "value_proj")

    assert labels["blocks"][0]["attention"]["value_proj"]["kernel"] == "frozen"
    assert labels["blocks"][0]["attention"]["key_proj"]["kernel"] != "frozen"
    assert labels["embedding"]["embedding"] != "frozen"


def test_probe_batch_own_stream():
    _, config = load_config("birth_transformer", "tiny")
    source = TaskData(config)
    probe = birth.probe_batch(source)["inputs"]
    rows = len(probe)

    first_training = source.train_batch(config.train.seed, 0, 0, rows)["inputs"]
    first_validation = source.validation_batches(1)[0]["inputs"]
    shared_rows = min(rows, len(first_validation))
    assert first_training.shape == probe.shape
    assert not np.array_equal(probe, first_training)
    assert not np.array_equal(probe[:shared_rows], first_validation[:shared_rows])


def test_transition_step_finds_half_drop():
    steps = np.array([0, 10, 20, 30, 40])
    assert birth.transition_step(steps, np.array([4.0, 3.9, 3.0, 2.0, 2.0])) == 20
    assert birth.transition_step(steps, np.array([1.0, 1.0, 1.5, 2.0, 2.0])) is None
    flat = np.array([0.03, 0.031, 0.029, 0.03, 0.028])
    assert birth.transition_step(steps, -flat, min_change=0.1) is None


def test_transition_step_measures_from_peak():
    steps = np.array([0, 10, 20, 30, 40])
    assert birth.transition_step(steps, np.array([2.0, 3.0, 4.0, 2.5, 1.0])) == 30
