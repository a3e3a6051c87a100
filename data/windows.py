"""Fixed-length token windows for training and evaluation.

A window has `seq_len + 1` tokens: the model reads `window[:-1]` and predicts `window[1:]`.
"""

import numpy as np


def train_batch(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    process_index: int = 0,
    batch_size: int,
    seq_len: int,
) -> np.ndarray:
    """Draw `batch_size` random windows of `tokens` as an int32 array (batch_size, seq_len + 1).

    The batch is a pure function of (`seed`, `step`, `process_index`): a resumed run draws exactly
    the batches it would have drawn, and each process of a multi-host job draws its own windows.
    `batch_size` is this process's share of the global batch. Window starts are uniform over all
    `len(tokens) - seq_len` valid starts, drawn with replacement.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    for field, value in (("seed", seed), ("step", step), ("process_index", process_index)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
    num_starts = _num_valid_starts(tokens, seq_len)

    rng = np.random.default_rng([int(seed), int(step), int(process_index)])
    starts = rng.integers(0, num_starts, size=batch_size)
    return _gather_windows(tokens, starts, seq_len)


def validation_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
) -> np.ndarray:
    """Cut a fixed set of evenly spaced windows: int32 (num_batches, batch_size, seq_len + 1).

    Starts run from the first valid start to the last, so the windows cover the whole array. They
    overlap when `tokens` has fewer than `num_batches * batch_size * (seq_len + 1)` tokens.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    _check_positive("num_batches", num_batches)
    num_starts = _num_valid_starts(tokens, seq_len)

    num_windows = num_batches * batch_size
    starts = np.linspace(0, num_starts - 1, num=num_windows).astype(np.int64)
    windows = _gather_windows(tokens, starts, seq_len)
    return windows.reshape(num_batches, batch_size, seq_len + 1)


def _gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    # Fancy indexing reads only the pages of a memory-mapped array that the windows touch.
    positions = starts[:, None] + np.arange(seq_len + 1)
    return np.asarray(tokens[positions], dtype=np.int32)


def _num_valid_starts(tokens: np.ndarray, seq_len: int) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"tokens (length {len(tokens)}) is shorter than one window of "
            f"seq_len + 1 = {seq_len + 1}. "
            "Lower seq_len or use a larger corpus"
        )
    return len(tokens) - seq_len


def _check_positive(field: str, value: int) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
