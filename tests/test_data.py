"""Tests for the byte tokenizer, corpus loading and caching, windows and the entropy baseline."""

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import data
from data import SEPARATOR, SEPARATOR_TEXT, ByteTokenizer, token_files

# ---- helpers


def write_folder(root: Path, num_files: int) -> dict[str, bytes]:
    """Write `num_files` small text files with unique contents; return relative path -> bytes."""
    contents = {}
    for index in range(num_files):
        relative = f"pkg{index % 3}/module_{index:03d}.txt"
        text = f"# file {index}\nvalue = {index * 7919}\nname = 'módulo {index}'\n".encode("utf-8")
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(text)
        contents[relative] = text
    return contents


def split_documents(tokens: np.ndarray) -> list[bytes]:
    """Cut a token array at separators and return each document's bytes."""
    documents, current = [], []
    for token in np.asarray(tokens).tolist():
        if token == SEPARATOR:
            documents.append(bytes(current))
            current = []
        else:
            current.append(token)
    documents.append(bytes(current))
    return documents


def arange_tokens(length: int) -> np.ndarray:
    """Tokens whose value is their own position, so a window's first value is its start."""
    return np.arange(length, dtype=np.uint16)


# ---- tokenizer


def test_tokenizer_vocabulary():
    tokenizer = ByteTokenizer()

    assert tokenizer.vocab_size == 257
    assert tokenizer.SEPARATOR == 256
    assert tokenizer.encode("a").dtype == np.uint16


def test_tokenizer_byte_ids_equal_values():
    all_bytes = bytes(range(256))

    ids = ByteTokenizer().encode(all_bytes)

    np.testing.assert_array_equal(ids, np.arange(256))


def test_tokenizer_round_trips_arbitrary_bytes():
    tokenizer = ByteTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(20):
        raw = rng.integers(0, 256, size=int(rng.integers(0, 200))).astype(np.uint8).tobytes()

        ids = tokenizer.encode(raw)

        assert ids.astype(np.uint8).tobytes() == raw
        assert tokenizer.decode(ids) == raw.decode("utf-8", errors="replace")


def test_tokenizer_round_trips_non_ascii_text():
    tokenizer = ByteTokenizer()
    text = "naïve café — 日本語のテキスト, Ελληνικά, emoji 🐍🚀\n\ttabs and ascii"

    ids = tokenizer.encode(text)

    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_decode_writes_marker_for_separator():
    tokenizer = ByteTokenizer()
    ids = np.concatenate([tokenizer.encode("first"), [SEPARATOR], tokenizer.encode("second")])

    assert tokenizer.decode(ids) == "first" + SEPARATOR_TEXT + "second"
    assert tokenizer.decode([SEPARATOR]) == SEPARATOR_TEXT


def test_decode_replaces_character_cut_by_separator():
    tokenizer = ByteTokenizer()
    snake = "🐍".encode("utf-8")
    ids = np.concatenate([tokenizer.encode(snake[:2]), [SEPARATOR], tokenizer.encode(snake[2:])])

    decoded = tokenizer.decode(ids)

    assert "🐍" not in decoded
    assert decoded.startswith("\ufffd" + SEPARATOR_TEXT)
    assert set(decoded.removeprefix("\ufffd" + SEPARATOR_TEXT)) == {"\ufffd"}


@pytest.mark.parametrize("bad_id", [257, -1, 1000])
def test_decode_rejects_out_of_range_id(bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
        ByteTokenizer().decode([65, bad_id])


# ---- folder corpora


def test_folder_split_each_file_once(tmp_path):
    contents = write_folder(tmp_path, 60)

    corpus = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.3)

    assert corpus.split == "by_file"
    assert corpus.num_files == 60
    assert sorted(corpus.train_files + corpus.val_files) == sorted(contents)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert split_documents(corpus.train) == [contents[path] for path in corpus.train_files]
    assert split_documents(corpus.val) == [contents[path] for path in corpus.val_files]


def test_folder_split_follows_relative_path_hash(tmp_path):
    write_folder(tmp_path, 60)

    corpus = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.3)

    for path in corpus.val_files:
        assert data.is_validation_file(path, 0.3)
    for path in corpus.train_files:
        assert not data.is_validation_file(path, 0.3)


def test_folder_split_fraction_near_requested(tmp_path):
    write_folder(tmp_path, 300)

    corpus = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.2)

    # Binomial(300, 0.2) has mean 60 and standard deviation about 7.
    assert 30 <= len(corpus.val_files) <= 90


def test_folder_split_is_deterministic_across_copies(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    write_folder(original, 40)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    first = data.load_corpus(original, pattern="**/*.txt", val_fraction=0.3)
    second = data.load_corpus(copy, pattern="**/*.txt", val_fraction=0.3)

    assert first.val_files == second.val_files
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)


def test_folder_split_unchanged_by_new_files(tmp_path):
    write_folder(tmp_path, 40)
    before = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.3)

    (tmp_path / "pkg0" / "added.txt").write_text("x = 1\n")
    after = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.3)

    assert set(before.val_files) <= set(after.val_files)
    assert set(before.train_files) <= set(after.train_files)


def test_folder_pattern_selects_files(tmp_path):
    write_folder(tmp_path, 30)
    (tmp_path / "notes.md").write_text("not matched\n")

    corpus = data.load_corpus(tmp_path, pattern="pkg1/*.txt", val_fraction=0.5)

    assert all(path.startswith("pkg1/") for path in corpus.train_files + corpus.val_files)
    assert corpus.num_files == 10


def test_folder_skips_empty_files(tmp_path):
    contents = write_folder(tmp_path, 30)
    (tmp_path / "pkg0" / "empty.txt").write_bytes(b"")

    corpus = data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.3)

    assert corpus.num_files == 30
    assert "pkg0/empty.txt" not in corpus.train_files + corpus.val_files
    assert b"" not in split_documents(corpus.train) + split_documents(corpus.val)
    assert len(corpus.train) + len(corpus.val) == sum(map(len, contents.values())) + 30 - 2


# ---- single files


def test_text_file_splits_by_position(tmp_path):
    text = ("línea de texto número {}\n" * 20).format(*range(20)).encode("utf-8")
    path = tmp_path / "book.txt"
    path.write_bytes(text)

    corpus = data.load_corpus(path, val_fraction=0.1)

    num_val = math.floor(0.1 * len(text))
    assert corpus.split == "by_position"
    assert corpus.num_files == 1
    assert corpus.train.astype(np.uint8).tobytes() == text[:-num_val]
    assert corpus.val.astype(np.uint8).tobytes() == text[-num_val:]


def test_text_file_cached_matches_in_memory(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("una línea\n" * 50, encoding="utf-8")

    in_memory = data.load_corpus(path, val_fraction=0.2)
    cached = data.load_corpus(path, val_fraction=0.2, cache_dir=tmp_path / "cache")

    assert isinstance(cached.train, np.memmap)
    np.testing.assert_array_equal(in_memory.train, cached.train)
    np.testing.assert_array_equal(in_memory.val, cached.val)


def test_token_file_is_used_as_is(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 257
    path = tmp_path / "tokens.bin"
    tokens.astype("<u2").tofile(path)

    corpus = data.load_corpus(path, val_fraction=0.25)

    assert corpus.split == "by_position"
    np.testing.assert_array_equal(corpus.train, tokens[:750])
    np.testing.assert_array_equal(corpus.val, tokens[750:])


def test_token_file_rejects_odd_size(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")

    with pytest.raises(ValueError, match="odd.bin has 3 bytes"):
        data.load_corpus(path)


def test_token_file_rejects_id_out_of_vocabulary(tmp_path):
    path = tmp_path / "big.bin"
    np.array([1, 2, 300, 4] * 50, dtype="<u2").tofile(path)

    with pytest.raises(ValueError, match="big.bin contains id 300"):
        data.load_corpus(path)


def test_token_file_rejects_first_id_past_separator(tmp_path):
    # 256 is the separator and the last valid id, so 257 is the first invalid one.
    path = tmp_path / "edge.bin"
    np.array([1, 256, 257, 4] * 50, dtype="<u2").tofile(path)

    with pytest.raises(ValueError, match="edge.bin contains id 257, but valid ids are 0..256"):
        data.load_corpus(path)


# ---- token-file cache


def test_cache_memmap_matches_in_memory(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_folder(folder, 30)

    in_memory = data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.3)
    cached = data.load_corpus(
        folder, pattern="**/*.txt", val_fraction=0.3, cache_dir=tmp_path / "cache"
    )

    assert isinstance(cached.train, np.memmap)
    assert isinstance(cached.val, np.memmap)
    assert len(cached.cache_files) == 2
    np.testing.assert_array_equal(in_memory.train, cached.train)
    np.testing.assert_array_equal(in_memory.val, cached.val)


def test_cache_is_reused_when_unchanged(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_folder(folder, 30)
    cache_dir = tmp_path / "cache"
    first = data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.3, cache_dir=cache_dir)
    mtimes = [os.stat(path).st_mtime_ns for path in first.cache_files]

    def fail_to_read(self, path):
        raise AssertionError(f"{path} was read again although the cache is up to date")

    monkeypatch.setattr(token_files.TokenWriter, "write_text_file", fail_to_read)
    second = data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.3, cache_dir=cache_dir)

    assert second.cache_files == first.cache_files
    assert [os.stat(path).st_mtime_ns for path in second.cache_files] == mtimes
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)


def test_cache_keeps_splits_of_each_val_fraction_apart(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_folder(folder, 30)
    cache_dir = tmp_path / "cache"

    for val_fraction in (0.3, 0.5):
        cached = data.load_corpus(folder, pattern="**/*.txt", val_fraction=val_fraction,
                                  cache_dir=cache_dir)
        fresh = data.load_corpus(folder, pattern="**/*.txt", val_fraction=val_fraction)
        assert cached.val_files == fresh.val_files
        np.testing.assert_array_equal(cached.val, fresh.val)


def test_cache_is_rebuilt_when_file_changes(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_folder(folder, 30)
    cache_dir = tmp_path / "cache"
    first = data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.3, cache_dir=cache_dir)
    changed = folder / first.train_files[0]
    old_stat = changed.stat()
    inodes = [os.stat(path).st_ino for path in first.cache_files]

    # Same size, new content and a later modification time, as an in-place edit would leave it.
    new_text = b"Z" * old_stat.st_size
    changed.write_bytes(new_text)
    os.utime(changed, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns + 10**9))
    second = data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.3, cache_dir=cache_dir)

    assert os.stat(second.cache_files[0]).st_ino != inodes[0]
    assert split_documents(second.train)[0] == new_text


def test_cache_build_failure_leaves_no_files(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_folder(folder, 30)
    (folder / "pkg2" / "zzz_binary.txt").write_bytes(b"header\x00\x01\x02")
    cache_dir = tmp_path / "cache"

    with pytest.raises(ValueError, match="NUL byte"):
        data.load_corpus(folder, pattern="**/*.txt", val_fraction=0.5, cache_dir=cache_dir)

    assert list(cache_dir.iterdir()) == []


# ---- default corpus


def test_default_corpus_is_standard_library_source(tmp_path):
    corpus = data.load_corpus(cache_dir=tmp_path)

    assert corpus.name.startswith("python")
    assert corpus.num_files > 100
    assert len(corpus.val_files) > 0
    for path in corpus.train_files + corpus.val_files:
        parts = Path(path).parts
        assert path.endswith(".py")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts)
    assert "os.py" in corpus.train_files + corpus.val_files
    assert int(corpus.train.max()) <= SEPARATOR
    assert 0.0 < data.unigram_entropy_bits(corpus.train) < math.log2(257)


# ---- windows


def test_train_batch_shape_and_dtype():
    batch = data.train_batch(arange_tokens(500), seed=0, step=0, batch_size=3, seq_len=16)

    assert batch.shape == (3, 17)
    assert batch.dtype == np.int32


def test_train_windows_contiguous_inside_array():
    tokens = arange_tokens(300)
    seq_len = 20
    for step in range(50):
        batch = data.train_batch(tokens, seed=1, step=step, batch_size=4, seq_len=seq_len)
        for window in batch:
            start = int(window[0])
            assert 0 <= start <= len(tokens) - (seq_len + 1)
            np.testing.assert_array_equal(window, np.arange(start, start + seq_len + 1))


def test_train_batch_reaches_every_valid_start():
    seq_len = 10
    tokens = arange_tokens(seq_len + 1 + 4)

    starts = set()
    for step in range(100):
        batch = data.train_batch(tokens, seed=0, step=step, batch_size=4, seq_len=seq_len)
        starts.update(int(window[0]) for window in batch)

    assert starts == {0, 1, 2, 3, 4}


def test_train_batch_is_deterministic():
    tokens = arange_tokens(5000)
    kwargs = dict(seed=7, step=3, process_index=1, batch_size=8, seq_len=32)

    first = data.train_batch(tokens, **kwargs)
    np.random.seed(123)
    second = data.train_batch(tokens, **kwargs)

    np.testing.assert_array_equal(first, second)


def test_train_batch_differs_by_step_seed_and_process():
    tokens = arange_tokens(50000)
    base = dict(seed=7, step=3, process_index=0, batch_size=8, seq_len=32)
    reference = data.train_batch(tokens, **base)

    for field, value in (("step", 4), ("seed", 8), ("process_index", 1)):
        other = data.train_batch(tokens, **{**base, field: value})
        assert not np.array_equal(reference, other), field


def test_train_batch_resume_matches_uninterrupted():
    tokens = arange_tokens(10000)
    kwargs = dict(seed=3, batch_size=4, seq_len=16)
    uninterrupted = [data.train_batch(tokens, step=step, **kwargs) for step in range(10)]

    before_restart = [data.train_batch(tokens, step=step, **kwargs) for step in range(6)]
    # Unrelated draws between the runs must not shift the resumed batches.
    data.train_batch(tokens, step=0, process_index=5, **kwargs)
    np.random.seed(0)
    after_restart = [data.train_batch(tokens, step=step, **kwargs) for step in range(6, 10)]

    for expected, actual in zip(uninterrupted, before_restart + after_restart, strict=True):
        np.testing.assert_array_equal(expected, actual)


def test_train_batch_reads_memory_mapped_tokens(tmp_path):
    path = tmp_path / "tokens.bin"
    arange_tokens(1000).astype("<u2").tofile(path)
    tokens = np.memmap(path, dtype="<u2", mode="r")

    batch = data.train_batch(tokens, seed=0, step=0, batch_size=2, seq_len=8)

    for window in batch:
        np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 9))


def test_validation_windows_evenly_spaced():
    tokens = arange_tokens(1000)
    seq_len = 9

    batches = data.validation_batches(tokens, seq_len=seq_len, batch_size=4, num_batches=5)

    assert batches.shape == (5, 4, seq_len + 1)
    assert batches.dtype == np.int32
    windows = batches.reshape(-1, seq_len + 1)
    starts = windows[:, 0]
    assert starts[0] == 0
    assert windows[-1, -1] == len(tokens) - 1
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1
    for window in windows:
        np.testing.assert_array_equal(window, np.arange(window[0], window[0] + seq_len + 1))


def test_validation_batches_are_deterministic():
    tokens = np.random.default_rng(0).integers(0, 257, size=3000).astype(np.uint16)

    first = data.validation_batches(tokens, seq_len=16, batch_size=2, num_batches=3)
    second = data.validation_batches(tokens, seq_len=16, batch_size=2, num_batches=3)

    np.testing.assert_array_equal(first, second)


def test_windows_accept_exactly_one_window():
    tokens = arange_tokens(11)

    train = data.train_batch(tokens, seed=0, step=0, batch_size=2, seq_len=10)
    val = data.validation_batches(tokens, seq_len=10, batch_size=2, num_batches=1)

    np.testing.assert_array_equal(train, np.tile(np.arange(11), (2, 1)))
    np.testing.assert_array_equal(val[0], np.tile(np.arange(11), (2, 1)))


# ---- entropy


def test_entropy_two_equal_bytes_one_bit():
    tokens = np.array([65, 66] * 500, dtype=np.uint16)

    assert data.unigram_entropy_bits(tokens) == pytest.approx(1.0)


def test_entropy_of_known_distributions():
    single = data.unigram_entropy_bits(np.full(100, 7, dtype=np.uint16))
    assert single == 0.0
    assert f"{single:.3f}" == "0.000"  # not -0.000 in the log line
    assert data.unigram_entropy_bits(np.arange(256, dtype=np.uint16)) == pytest.approx(8.0)
    skewed = np.array([0, 0, 0, 1] * 25, dtype=np.uint16)
    skewed_entropy = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert data.unigram_entropy_bits(skewed) == pytest.approx(skewed_entropy)


def test_entropy_counts_separator():
    tokens = np.array([0, SEPARATOR, 1, SEPARATOR], dtype=np.uint16)

    assert data.unigram_entropy_bits(tokens) == pytest.approx(1.5)


# ---- invalid input


def test_missing_path_raises(tmp_path):
    with pytest.raises(ValueError, match="does_not_exist.*does not exist"):
        data.load_corpus(tmp_path / "does_not_exist")


def test_pattern_matching_no_files_raises(tmp_path):
    write_folder(tmp_path, 5)

    with pytest.raises(ValueError, match=r"pattern '\*\*/\*.rst' matched no files"):
        data.load_corpus(tmp_path, pattern="**/*.rst")


def test_folder_of_empty_files_raises(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")

    with pytest.raises(ValueError, match="is empty: all 2 files"):
        data.load_corpus(tmp_path, pattern="*.txt")


@pytest.mark.parametrize("suffix", [".txt", ".bin"])
def test_empty_single_file_raises(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")

    with pytest.raises(ValueError, match=f"empty{suffix}.* empty"):
        data.load_corpus(path)


def test_nul_byte_raises_with_offset(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"GIF89a\x00\x01")

    message = r"image.txt is not a text file \(NUL byte at byte offset 6\)"
    with pytest.raises(ValueError, match=message):
        data.load_corpus(path, val_fraction=0.5)


def test_short_binary_file_reported_as_not_text(tmp_path):
    # Five bytes are too few for a validation split at the default val_fraction, but the file's
    # content is the problem to report.
    path = tmp_path / "blob.txt"
    path.write_bytes(b"ab\x00cd")

    with pytest.raises(ValueError, match=r"blob.txt is not a text file \(NUL byte"):
        data.load_corpus(path)


def test_invalid_utf8_raises_naming_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf".encode() + "é au lait".encode("latin-1"))

    message = r"latin1.txt is not a text file \(invalid UTF-8 at byte offset 3\)"
    with pytest.raises(ValueError, match=message):
        data.load_corpus(path, val_fraction=0.5)


def test_invalid_utf8_across_chunks_offset(tmp_path):
    path = tmp_path / "cut.txt"
    # A 3-byte character split over the first two 4-byte chunks, then a stray continuation byte.
    path.write_bytes(b"abc" + "€".encode() + b"de\x80f")

    with pytest.raises(ValueError, match=r"invalid UTF-8 at byte offset 8"):
        list(token_files.read_text_chunks(path, chunk_bytes=4))


def test_truncated_utf8_at_end_raises(tmp_path):
    path = tmp_path / "truncated.txt"
    path.write_bytes(b"hello " + "€".encode()[:2])

    with pytest.raises(ValueError, match=r"invalid UTF-8 at byte offset 6"):
        data.load_corpus(path, val_fraction=0.5)


def test_binary_file_in_folder_raises_naming_it(tmp_path):
    write_folder(tmp_path, 10)
    (tmp_path / "pkg0" / "blob.txt").write_bytes(b"\x89PNG\x00")

    with pytest.raises(ValueError, match="blob.txt is not a text file"):
        data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=0.5)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_val_fraction_outside_open_interval_raises(tmp_path, val_fraction):
    write_folder(tmp_path, 5)

    with pytest.raises(ValueError, match="val_fraction must be a number strictly between 0 and 1"):
        data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=val_fraction)


@pytest.mark.parametrize("pattern", ["", "/etc/*.conf"])
def test_invalid_pattern_raises(tmp_path, pattern):
    with pytest.raises(ValueError, match="pattern must be a non-empty glob"):
        data.load_corpus(tmp_path, pattern=pattern)


def test_empty_validation_split_of_folder_raises(tmp_path):
    write_folder(tmp_path, 3)

    # With 3 files, the chance that any hashes below 1e-9 of the range is about 3e-9.
    with pytest.raises(ValueError, match="validation split of corpus folder .* is empty"):
        data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=1e-9)


def test_empty_training_split_of_folder_raises(tmp_path):
    write_folder(tmp_path, 3)

    with pytest.raises(ValueError, match="training split of corpus folder .* is empty"):
        data.load_corpus(tmp_path, pattern="**/*.txt", val_fraction=1 - 1e-9)


def test_empty_validation_split_of_file_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only nineteen bytes")

    with pytest.raises(ValueError, match="validation split of .*short.txt is empty"):
        data.load_corpus(path, val_fraction=0.05)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 0),
        ("seq_len", -3),
        ("batch_size", 0),
        ("seed", -1),
        ("step", -1),
        ("process_index", -2),
    ],
)
def test_train_batch_rejects_invalid_argument(field, value):
    kwargs = dict(seed=0, step=0, process_index=0, batch_size=2, seq_len=8)
    kwargs[field] = value

    with pytest.raises(ValueError, match=f"{field} must be a .*, got {value}"):
        data.train_batch(arange_tokens(100), **kwargs)


def test_train_batch_rejects_short_tokens():
    message = r"tokens \(length 8\) is shorter than one window of seq_len \+ 1 = 9"
    with pytest.raises(ValueError, match=message):
        data.train_batch(arange_tokens(8), seed=0, step=0, batch_size=1, seq_len=8)


@pytest.mark.parametrize(
    ("field", "value"), [("seq_len", 0), ("batch_size", -1), ("num_batches", 0)]
)
def test_validation_batches_reject_invalid_argument(field, value):
    kwargs = dict(seq_len=8, batch_size=2, num_batches=2)
    kwargs[field] = value

    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {value}"):
        data.validation_batches(arange_tokens(100), **kwargs)


def test_validation_batches_reject_short_tokens():
    with pytest.raises(ValueError, match="shorter than one window"):
        data.validation_batches(arange_tokens(5), seq_len=5, batch_size=1, num_batches=1)


def test_entropy_of_empty_tokens_raises():
    with pytest.raises(ValueError, match="tokens is empty"):
        data.unigram_entropy_bits(np.zeros(0, dtype=np.uint16))


def test_binary_folder_names_the_file(tmp_path):
    # One file can fill only one split; that the file is not text is the problem to report.
    (tmp_path / "blob.py").write_bytes(b"\x7fELF\x00\x01")

    with pytest.raises(ValueError, match="blob.py is not a text file"):
        data.load_corpus(tmp_path)
