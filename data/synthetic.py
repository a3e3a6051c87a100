"""Synthetic sequence tasks from the literature on Mamba, Transformers and in-context learning.

Every generator is a pure function of `(seed, step, process_index)` and its sizes, so a resumed or
multi-host run sees exactly the batches it would have seen. `batch_size` is the number of sequences
that this process generates. Each returns a dict of numpy arrays:

  inputs     int32 (b, t)  token ids fed to the model
  targets    int32 (b, t)  the token the model should output at each position
  loss_mask  bool  (b, t)  True only where the task is scored

Where `loss_mask` is False, `targets` holds 0, a valid token id that carries no information
(language-modeling tasks score every position and have real targets everywhere).

Tasks:
  selective_copying_batch      Gu & Dao 2023, "Mamba", selective copying task
  induction_heads_batch        Gu & Dao 2023, "Mamba", induction heads task
  associative_recall_batch     Arora et al. 2023, "Zoology", multi-query associative recall (MQAR)
  bietti_bigram_batch          Bietti et al. 2023, "Birth of a Transformer: A Memory Viewpoint"
"""

from collections.abc import Callable
from typing import Any

import numpy as np

SyntheticBatch = dict[str, np.ndarray]


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """Return `value` as an int, or raise ValueError naming the field, the value and the range."""
    allowed = f"an integer >= {minimum}" if maximum is None else (
        f"an integer in [{minimum}, {maximum}]")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def _rng(seed: int, step: int, process_index: int) -> np.random.Generator:
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    process_index = _check_int("process_index", process_index, 0)
    return np.random.default_rng([seed, step, process_index])


def _distinct_per_row(rng: np.random.Generator, batch_size: int, population: int,
                      count: int) -> np.ndarray:
    """Draw `count` distinct integers from [0, population) for each row, in random order.

    Ranking uniform keys costs O(batch_size * population) time and memory, with no Python loop.
    """
    keys = rng.random((batch_size, population))
    chosen = np.argpartition(keys, count - 1, axis=1)[:, :count]
    order = np.argsort(rng.random((batch_size, count)), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


# ---------------------------------------------------------------------------------------------
# Selective copying
# ---------------------------------------------------------------------------------------------

SELECTIVE_COPYING_NOISE = 0


def selective_copying_batch(*, seed: int, step: int, process_index: int = 0, batch_size: int,
                            seq_len: int, num_data_tokens: int = 16,
                            vocab_size: int = 16) -> SyntheticBatch:
    """Generate a batch of the selective copying task.

    Token 0 is noise, token `vocab_size - 1` is the marker, and tokens 1 .. `vocab_size - 2` are
    data. The first `seq_len - num_data_tokens` positions are noise with `num_data_tokens` data
    tokens at distinct random positions. The last `num_data_tokens` inputs are markers, and at
    those positions the targets are the data tokens in their order of appearance. Only these
    last positions are scored. Because the inputs there are markers rather than the previous
    data token, the model must recall every data token from its state.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 3)
    num_data_tokens = _check_int("num_data_tokens", num_data_tokens, 1)
    seq_len = _check_int("seq_len", seq_len, 2 * num_data_tokens)
    rng = _rng(seed, step, process_index)
    marker = vocab_size - 1
    context_len = seq_len - num_data_tokens

    data_bk = rng.integers(1, marker, size=(batch_size, num_data_tokens), dtype=np.int32)
    positions_bk = np.sort(_distinct_per_row(rng, batch_size, context_len, num_data_tokens), axis=1)

    inputs = np.full((batch_size, seq_len), SELECTIVE_COPYING_NOISE, dtype=np.int32)
    np.put_along_axis(inputs, positions_bk, data_bk, axis=1)
    inputs[:, context_len:] = marker

    targets = np.zeros((batch_size, seq_len), dtype=np.int32)
    targets[:, context_len:] = data_bk
    loss_mask = np.zeros((batch_size, seq_len), dtype=bool)
    loss_mask[:, context_len:] = True
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


# ---------------------------------------------------------------------------------------------
# Induction heads
# ---------------------------------------------------------------------------------------------

def induction_heads_batch(*, seed: int, step: int, process_index: int = 0, batch_size: int,
                          seq_len: int, vocab_size: int = 16) -> SyntheticBatch:
    """Generate a batch of the induction heads task.

    Token `vocab_size - 1` is the trigger. Every other input is uniform over the remaining
    `vocab_size - 1` tokens, except that the trigger appears at one random position p in
    [0, seq_len - 3] and again at the last position. Only the last position is scored, and its
    target is the token at p + 1. Generation is vectorized numpy with no loop over positions, so
    evaluation lengths up to 2**20 are cheap.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 3)
    seq_len = _check_int("seq_len", seq_len, 3)
    rng = _rng(seed, step, process_index)
    trigger = vocab_size - 1
    rows = np.arange(batch_size)

    inputs = rng.integers(0, trigger, size=(batch_size, seq_len), dtype=np.int32)
    first_b = rng.integers(0, seq_len - 2, size=batch_size)
    inputs[rows, first_b] = trigger
    inputs[:, -1] = trigger

    targets = np.zeros((batch_size, seq_len), dtype=np.int32)
    targets[:, -1] = inputs[rows, first_b + 1]
    loss_mask = np.zeros((batch_size, seq_len), dtype=bool)
    loss_mask[:, -1] = True
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


# ---------------------------------------------------------------------------------------------
# Multi-query associative recall
# ---------------------------------------------------------------------------------------------

def associative_recall_batch(*, seed: int, step: int, process_index: int = 0, batch_size: int,
                             seq_len: int, num_kv_pairs: int, num_queries: int | None = None,
                             vocab_size: int = 8192) -> SyntheticBatch:
    """Generate a batch of multi-query associative recall (MQAR).

    Keys are drawn from [0, vocab_size // 2) and values from [vocab_size // 2, vocab_size), both
    distinct within a sequence. The first 2 * num_kv_pairs inputs are the pairs
    k_1 v_1 k_2 v_2 .... The rest of the sequence has query slots at even offsets, and
    `num_queries` distinct keys (all of them by default) sit in randomly chosen slots. At a query
    position the target is that key's value, and only query positions are scored. The remaining
    positions hold uniform random tokens from the whole vocabulary, so a key can also appear
    there unscored.

    NOTE: Zoology places queries with a power-law bias towards the start of the query region;
    this version places them uniformly.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 2)
    num_kv_pairs = _check_int("num_kv_pairs", num_kv_pairs, 1, vocab_size // 2)
    if num_queries is None:
        num_queries = num_kv_pairs
    num_queries = _check_int("num_queries", num_queries, 1, num_kv_pairs)
    seq_len = _check_int("seq_len", seq_len, 2 * num_kv_pairs + 2 * num_queries - 1)
    rng = _rng(seed, step, process_index)
    key_vocab = vocab_size // 2
    context_len = 2 * num_kv_pairs
    num_slots = (seq_len - context_len + 1) // 2

    keys_bk = _distinct_per_row(rng, batch_size, key_vocab, num_kv_pairs)
    values_bk = key_vocab + _distinct_per_row(rng, batch_size, vocab_size - key_vocab,
                                              num_kv_pairs)
    queried_bq = _distinct_per_row(rng, batch_size, num_kv_pairs, num_queries)
    slots_bq = _distinct_per_row(rng, batch_size, num_slots, num_queries)
    query_positions_bq = context_len + 2 * slots_bq

    inputs = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    inputs[:, 0:context_len:2] = keys_bk
    inputs[:, 1:context_len:2] = values_bk
    np.put_along_axis(inputs, query_positions_bq,
                      np.take_along_axis(keys_bk, queried_bq, axis=1), axis=1)

    targets = np.zeros((batch_size, seq_len), dtype=np.int32)
    np.put_along_axis(targets, query_positions_bq,
                      np.take_along_axis(values_bk, queried_bq, axis=1).astype(np.int32), axis=1)
    loss_mask = np.zeros((batch_size, seq_len), dtype=bool)
    np.put_along_axis(loss_mask, query_positions_bq, True, axis=1)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


# ---------------------------------------------------------------------------------------------
# "Birth of a Transformer" bigram language with in-context triggers
# ---------------------------------------------------------------------------------------------

def bigram_transition_matrix(vocab_size: int, data_seed: int = 0,
                             concentration: float = 0.1) -> np.ndarray:
    """Return the global bigram model: a row-stochastic (vocab_size, vocab_size) float64 matrix.

    Row i is the distribution of the token after token i, drawn from a symmetric Dirichlet with
    the given concentration (below 1, so each row puts most mass on a few tokens, like
    character bigrams). The matrix depends only on (vocab_size, data_seed, concentration).
    """
    vocab_size = _check_int("vocab_size", vocab_size, 2)
    data_seed = _check_int("data_seed", data_seed, 0)
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0, got {concentration!r}")
    rng = np.random.default_rng([data_seed, vocab_size])
    transitions = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    # Dirichlet draws with a small concentration can underflow to exact zeros. A floor keeps the
    # chain irreducible, so its stationary distribution is unique.
    transitions = np.maximum(transitions, 1e-6)
    return transitions / transitions.sum(axis=1, keepdims=True)


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
    """Return pi with pi @ transitions == pi and sum(pi) == 1 (the unigram distribution)."""
    vocab_size = transitions.shape[0]
    # Solve pi (P - I) = 0 together with sum(pi) = 1 as one least-squares system.
    system = np.concatenate([transitions.T - np.eye(vocab_size), np.ones((1, vocab_size))])
    rhs = np.concatenate([np.zeros(vocab_size), [1.0]])
    pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def bietti_bigram_batch(*, seed: int, step: int, process_index: int = 0, batch_size: int,
                        seq_len: int, vocab_size: int = 64, num_triggers: int = 3,
                        fixed_triggers: bool = False, data_seed: int = 0,
                        concentration: float = 0.1) -> SyntheticBatch:
    """Generate a batch of the bigram language with in-context triggers (Bietti et al. 2023).

    Each sequence picks `num_triggers` distinct trigger tokens and, for each trigger q, an output
    token o(q) drawn uniformly from the tokens that are not this sequence's triggers. By default
    the triggers are drawn from the unigram (stationary) distribution without replacement. With
    `fixed_triggers` they are the `num_triggers` most likely tokens under that distribution, the
    same for every sequence. The first token is drawn from the unigram distribution. After a
    trigger q the next token is always o(q), and after any other token i it is drawn from row i
    of `bigram_transition_matrix(vocab_size, data_seed, concentration)`.

    The outputs exclude all triggers so that o(q) is never a trigger. This stops chains like
    q -> q, which would repeat q to the end of the sequence. The original task draws o(q) from the
    whole vocabulary.

    Every position is scored (language modeling, targets are the next token). Two more masks
    split the positions for reporting:
      in_context_mask      the input is a trigger seen earlier in the sequence, so the target
                           o(q) can be copied from context
      global_bigram_mask   the input is not a trigger, so the target follows the global bigram
    The first occurrence of each trigger is in neither mask, because its target is uniform.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 3)
    num_triggers = _check_int("num_triggers", num_triggers, 1, vocab_size - 1)
    transitions = bigram_transition_matrix(vocab_size, data_seed, concentration)
    unigram = stationary_distribution(transitions)
    rng = _rng(seed, step, process_index)
    rows = np.arange(batch_size)

    if fixed_triggers:
        triggers_bk = np.tile(np.argsort(unigram)[::-1][:num_triggers], (batch_size, 1))
    else:
        # Gumbel top-k: the k largest of log(pi) + Gumbel noise are a draw of k tokens without
        # replacement, each step proportional to pi among the tokens not yet drawn.
        perturbed = np.log(unigram) + rng.gumbel(size=(batch_size, vocab_size))
        triggers_bk = np.argsort(-perturbed, axis=1)[:, :num_triggers]

    # Draw the r-th non-trigger token: walking the sorted triggers upwards, skip over each one.
    outputs_bk = rng.integers(0, vocab_size - num_triggers, size=(batch_size, num_triggers))
    for trigger_b in np.sort(triggers_bk, axis=1).T:
        outputs_bk = outputs_bk + (outputs_bk >= trigger_b[:, None])

    # next_token_bv[b, i]: the token after i in sequence b, or -1 where i is not a trigger.
    next_token_bv = np.full((batch_size, vocab_size), -1, dtype=np.int64)
    next_token_bv[rows[:, None], triggers_bk] = outputs_bk

    cumulative = np.cumsum(transitions, axis=1)
    cumulative[:, -1] = 1.0
    uniforms = rng.random((batch_size, seq_len + 1))
    tokens = np.empty((batch_size, seq_len + 1), dtype=np.int32)
    tokens[:, 0] = np.searchsorted(np.cumsum(unigram), uniforms[:, 0], side="right").clip(
        max=vocab_size - 1)
    for t in range(1, seq_len + 1):
        previous = tokens[:, t - 1]
        drawn = (uniforms[:, t, None] >= cumulative[previous]).sum(axis=1)
        forced = next_token_bv[rows, previous]
        tokens[:, t] = np.where(forced >= 0, forced, drawn)

    inputs = tokens[:, :-1]
    is_trigger = np.zeros((batch_size, seq_len), dtype=bool)
    is_repeated_trigger = np.zeros((batch_size, seq_len), dtype=bool)
    for k in range(num_triggers):
        hits = inputs == triggers_bk[:, k, None]
        is_trigger |= hits
        is_repeated_trigger |= hits & (np.cumsum(hits, axis=1) >= 2)

    return {
        "inputs": np.ascontiguousarray(inputs),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "loss_mask": np.ones((batch_size, seq_len), dtype=bool),
        "in_context_mask": is_repeated_trigger,
        "global_bigram_mask": ~is_trigger,
    }


# Generators by task name, for configs that select a task with a string.
SYNTHETIC_TASKS: dict[str, Callable[..., SyntheticBatch]] = {
    "selective_copying": selective_copying_batch,
    "induction_heads": induction_heads_batch,
    "associative_recall": associative_recall_batch,
    "bietti_bigram": bietti_bigram_batch,
}
