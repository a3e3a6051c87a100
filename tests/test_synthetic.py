"""Each synthetic task against a plain, slow checker of its definition, on small sizes."""

import numpy as np
import pytest

from data.synthetic import (
    associative_recall_batch,
    bietti_bigram_batch,
    bigram_transition_matrix,
    induction_heads_batch,
    selective_copying_batch,
    stationary_distribution,
)

SMALL_TASKS = {
    "selective_copying": (selective_copying_batch, dict(seq_len=48, num_data_tokens=8)),
    "induction_heads": (induction_heads_batch, dict(seq_len=20)),
    "associative_recall": (associative_recall_batch,
                           dict(seq_len=40, num_kv_pairs=6, num_queries=4, vocab_size=64)),
    "bietti_bigram": (bietti_bigram_batch, dict(seq_len=32, vocab_size=16, num_triggers=3)),
}


def check_common_layout(batch, batch_size, seq_len):
    for name in ("inputs", "targets"):
        assert batch[name].dtype == np.int32, name
        assert batch[name].shape == (batch_size, seq_len), name
    assert batch["loss_mask"].dtype == np.bool_
    assert batch["loss_mask"].shape == (batch_size, seq_len)


def test_selective_copying_targets_in_order():
    seq_len, num_data, vocab_size = 48, 8, 16
    batch = selective_copying_batch(seed=3, step=5, batch_size=16, seq_len=seq_len,
                                    num_data_tokens=num_data, vocab_size=vocab_size)
    check_common_layout(batch, 16, seq_len)
    noise, marker = 0, vocab_size - 1

    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
        context = list(inputs[:seq_len - num_data])
        data_in_order = [token for token in context if token != noise]
        assert len(data_in_order) == num_data
        assert all(1 <= token <= vocab_size - 2 for token in data_in_order)
        assert list(inputs[seq_len - num_data:]) == [marker] * num_data
        assert list(mask) == [False] * (seq_len - num_data) + [True] * num_data
        assert list(targets[mask]) == data_in_order


def test_selective_copying_data_positions_vary():
    batch = selective_copying_batch(seed=0, step=0, batch_size=32, seq_len=64,
                                    num_data_tokens=4)
    positions = {tuple(np.flatnonzero(row[:60])) for row in batch["inputs"]}
    assert len(positions) > 20


def test_induction_heads_target_follows_first_trigger():
    seq_len, vocab_size = 20, 16
    batch = induction_heads_batch(seed=1, step=2, batch_size=64, seq_len=seq_len,
                                  vocab_size=vocab_size)
    check_common_layout(batch, 64, seq_len)
    trigger = vocab_size - 1
    first_positions = set()

    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
        trigger_positions = [t for t in range(seq_len) if inputs[t] == trigger]
        assert len(trigger_positions) == 2
        first, last = trigger_positions
        assert last == seq_len - 1
        assert first + 1 < last
        assert list(mask) == [False] * (seq_len - 1) + [True]
        assert targets[-1] == inputs[first + 1]
        first_positions.add(first)

    assert len(first_positions) > 5


def test_induction_heads_at_two_to_the_20():
    seq_len = 2**20
    batch = induction_heads_batch(seed=0, step=0, batch_size=1, seq_len=seq_len)
    inputs = batch["inputs"][0]

    trigger_positions = np.flatnonzero(inputs == 15)
    assert len(trigger_positions) == 2
    assert trigger_positions[1] == seq_len - 1
    assert batch["targets"][0, -1] == inputs[trigger_positions[0] + 1]
    assert batch["loss_mask"].sum() == 1


def test_associative_recall_targets_are_values():
    seq_len, num_kv_pairs, num_queries, vocab_size = 40, 6, 4, 64
    batch = associative_recall_batch(seed=2, step=7, batch_size=32, seq_len=seq_len,
                                     num_kv_pairs=num_kv_pairs, num_queries=num_queries,
                                     vocab_size=vocab_size)
    check_common_layout(batch, 32, seq_len)
    context_len = 2 * num_kv_pairs

    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
        keys = [int(k) for k in inputs[0:context_len:2]]
        values = [int(v) for v in inputs[1:context_len:2]]
        assert len(set(keys)) == num_kv_pairs
        assert len(set(values)) == num_kv_pairs
        assert all(0 <= k < vocab_size // 2 for k in keys)
        assert all(vocab_size // 2 <= v < vocab_size for v in values)
        value_of = dict(zip(keys, values))

        query_positions = [t for t in range(seq_len) if mask[t]]
        assert len(query_positions) == num_queries
        queried_keys = [int(inputs[t]) for t in query_positions]
        assert len(set(queried_keys)) == num_queries
        for t in query_positions:
            assert t >= context_len
            assert (t - context_len) % 2 == 0
            assert int(targets[t]) == value_of[int(inputs[t])]


def test_associative_recall_queries_every_key_by_default():
    batch = associative_recall_batch(seed=0, step=0, batch_size=4, seq_len=24, num_kv_pairs=5,
                                     vocab_size=32)
    for inputs, mask in zip(batch["inputs"], batch["loss_mask"]):
        assert sorted(inputs[mask]) == sorted(inputs[0:10:2])


def test_bietti_triggers_keep_one_output_per_sequence():
    seq_len, vocab_size, num_triggers = 64, 16, 3
    batch = bietti_bigram_batch(seed=4, step=1, batch_size=32, seq_len=seq_len,
                                vocab_size=vocab_size, num_triggers=num_triggers)
    check_common_layout(batch, 32, seq_len)
    assert batch["loss_mask"].all()
    num_in_context = 0

    for b in range(32):
        inputs, targets = batch["inputs"][b], batch["targets"][b]
        in_context, global_bigram = batch["in_context_mask"][b], batch["global_bigram_mask"][b]
        assert list(targets[:-1]) == list(inputs[1:])

        triggers = {int(inputs[t]) for t in range(seq_len) if not global_bigram[t]}
        assert len(triggers) <= num_triggers
        outputs_seen = {}
        occurrences = {}
        for t in range(seq_len):
            token = int(inputs[t])
            if token not in triggers:
                assert global_bigram[t]
                assert not in_context[t]
                continue
            occurrences[token] = occurrences.get(token, 0) + 1
            assert in_context[t] == (occurrences[token] >= 2)
            outputs_seen.setdefault(token, set()).add(int(targets[t]))
        for trigger, outputs in outputs_seen.items():
            assert len(outputs) == 1, f"trigger {trigger} followed by {outputs} in row {b}"
            assert not outputs & triggers
        num_in_context += int(in_context.sum())

    assert num_in_context > 0


def test_bietti_fixed_triggers_are_most_likely_tokens():
    vocab_size, num_triggers = 16, 2
    unigram = stationary_distribution(bigram_transition_matrix(vocab_size))
    expected = set(np.argsort(unigram)[-num_triggers:].tolist())
    batch = bietti_bigram_batch(seed=0, step=0, batch_size=16, seq_len=64, vocab_size=vocab_size,
                                num_triggers=num_triggers, fixed_triggers=True)

    triggers_seen = set(batch["inputs"][~batch["global_bigram_mask"]].tolist())
    assert triggers_seen
    assert triggers_seen <= expected


def test_bietti_bigram_frequencies_match_matrix():
    vocab_size = 6
    transitions = bigram_transition_matrix(vocab_size, data_seed=1, concentration=1.0)
    counts = np.zeros((vocab_size, vocab_size))
    for step in range(8):
        batch = bietti_bigram_batch(seed=0, step=step, batch_size=128, seq_len=64,
                                    vocab_size=vocab_size, num_triggers=1, data_seed=1,
                                    concentration=1.0)
        mask = batch["global_bigram_mask"]
        np.add.at(counts, (batch["inputs"][mask], batch["targets"][mask]), 1)

    assert counts.sum(axis=1).min() > 3000
    frequencies = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(frequencies, transitions, atol=0.04)


def test_transition_matrix_fixed_by_data_seed():
    first = bigram_transition_matrix(64, data_seed=0)
    np.testing.assert_array_equal(first, bigram_transition_matrix(64, data_seed=0))
    assert not np.allclose(first, bigram_transition_matrix(64, data_seed=1))
    np.testing.assert_allclose(first.sum(axis=1), 1.0)
    assert (first > 0).all()


def test_stationary_distribution_is_invariant():
    transitions = bigram_transition_matrix(64)
    unigram = stationary_distribution(transitions)
    np.testing.assert_allclose(unigram @ transitions, unigram, atol=1e-10)
    assert unigram.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("task", sorted(SMALL_TASKS))
def test_batches_deterministic_in_seed_and_step(task):
    generate, sizes = SMALL_TASKS[task]
    first = generate(seed=11, step=3, process_index=1, batch_size=4, **sizes)
    again = generate(seed=11, step=3, process_index=1, batch_size=4, **sizes)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)

    for other in (dict(seed=11, step=4, process_index=1), dict(seed=11, step=3, process_index=0),
                  dict(seed=12, step=3, process_index=1)):
        different = generate(batch_size=4, **other, **sizes)
        assert not np.array_equal(first["inputs"], different["inputs"]), other


@pytest.mark.parametrize("generate, sizes, field, value", [
    (selective_copying_batch, dict(seq_len=20, num_data_tokens=16), "seq_len", "20"),
    (selective_copying_batch, dict(seq_len=64, vocab_size=2), "vocab_size", "2"),
    (selective_copying_batch, dict(seq_len=64, num_data_tokens=0), "num_data_tokens", "0"),
    (induction_heads_batch, dict(seq_len=2), "seq_len", "2"),
    (induction_heads_batch, dict(seq_len=16, vocab_size=2), "vocab_size", "2"),
    (associative_recall_batch, dict(seq_len=64, num_kv_pairs=40, vocab_size=64),
     "num_kv_pairs", "40"),
    (associative_recall_batch, dict(seq_len=64, num_kv_pairs=4, num_queries=5),
     "num_queries", "5"),
    (associative_recall_batch, dict(seq_len=14, num_kv_pairs=4), "seq_len", "14"),
    (bietti_bigram_batch, dict(seq_len=16, num_triggers=64), "num_triggers", "64"),
    (bietti_bigram_batch, dict(seq_len=0), "seq_len", "0"),
    (bietti_bigram_batch, dict(seq_len=16, concentration=0.0), "concentration", "0.0"),
    (induction_heads_batch, dict(seq_len=16, batch_size=0), "batch_size", "0"),
    (induction_heads_batch, dict(seq_len=16, step=-1), "step", "-1"),
    (induction_heads_batch, dict(seq_len=16.0), "seq_len", "16.0"),
])
def test_invalid_sizes_raise_naming_field(generate, sizes, field, value):
    arguments = dict(seed=0, step=0, batch_size=2) | sizes
    with pytest.raises(ValueError, match=field) as error:
        generate(**arguments)
    assert value in str(error.value)
