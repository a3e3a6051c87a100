"""Text corpora as byte-token arrays, split into training and validation parts.

`load_corpus` accepts:

- `None`: the default corpus, the `.py` files of the Python standard library that runs this code
  (`sysconfig.get_paths()["stdlib"]`). Files under a directory named `site-packages`,
  `dist-packages`, `test`, `tests` or `idle_test` are left out: they are third-party packages or
  the test suite, whose data files include deliberately mis-encoded sources.
- a folder: the files that `pattern` matches, each one document.
- a `.bin` file: pre-tokenized little-endian uint16 ids (see `data.token_files`), used as is.
- any other file: one UTF-8 text document.

A folder is split by file: a file goes to validation when a SHA-256 hash of its relative path
falls in the first `val_fraction` of the hash range. The split therefore never depends on the
order of listing, the machine, or which other files exist. Documents of each split are joined
with the separator id. A single file or token file is split by position instead: the last
`floor(val_fraction * num_tokens)` tokens are the validation part.

Empty files are skipped. Every other matched file must be UTF-8 without NUL bytes.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import numbers
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data import token_files
from data.token_files import TOKEN_DTYPE, TokenWriter

DEFAULT_CORPUS_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test"}
)
# Bumped whenever the layout or content of cache files changes, so old caches are rebuilt.
CACHE_FORMAT_VERSION = 1
_ENTROPY_CHUNK_TOKENS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation token arrays and where they came from.

    `train` and `val` are 1-D uint16 arrays, read-only, and memory-mapped from token files when the
    corpus was loaded with a `cache_dir` or from a `.bin` file.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    num_files: int  # number of non-empty documents read (1 for a single text or token file)
    split: str  # "by_file" (folders) or "by_position" (single files)
    source: str  # resolved path of the folder or file the tokens came from
    # Relative paths of the documents in each split, in the order they were joined. Empty for a
    # corpus split by position.
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    cache_files: tuple[str, ...] = ()  # token files backing `train` and `val`, if any

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val)


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    pattern: str = "**/*.py",
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Load a folder, text file or token file (or the standard library) as a `Corpus`.

    With `cache_dir`, text is tokenized file by file into token files under `cache_dir` and
    memory-mapped, so the corpus is never held in memory whole. The token files are reused while
    every source file keeps its size and modification time, and rebuilt otherwise. Without
    `cache_dir` the tokens are held in memory.
    """
    _check_val_fraction(val_fraction)
    _check_pattern(pattern)
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()

    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        files = _match_files(root, pattern, excluded_dirs=DEFAULT_CORPUS_EXCLUDED_DIRS)
        name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
        return _load_folder(root, files, name, pattern, val_fraction, cache_dir)

    source = Path(path).expanduser()
    if not source.exists():
        raise ValueError(
            f"corpus path {str(path)!r} does not exist. Pass an existing folder, UTF-8 text file "
            "or .bin token file, or None for the Python standard library"
        )
    source = source.resolve()
    if source.is_dir():
        files = _match_files(source, pattern, excluded_dirs=frozenset())
        return _load_folder(source, files, source.name, pattern, val_fraction, cache_dir)
    if source.suffix == ".bin":
        return _load_token_file(source, val_fraction)
    return _load_text_file(source, val_fraction, cache_dir)


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    """Return whether a folder's file goes to the validation split, from its relative path alone."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Compute the entropy in bits of the token frequency distribution of `tokens`.

    This is the lowest bits per byte that a model ignoring context can reach on these tokens
    (the separator counts as a token), the baseline for a language model's bits per byte. Large
    memory-mapped arrays are counted in chunks.
    """
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise ValueError("tokens is empty, but the entropy needs at least one token")

    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, tokens.size, _ENTROPY_CHUNK_TOKENS):
        chunk_counts = np.bincount(tokens[start:start + _ENTROPY_CHUNK_TOKENS])
        if len(chunk_counts) > len(counts):
            counts = np.pad(counts, (0, len(chunk_counts) - len(counts)))
        counts[:len(chunk_counts)] += chunk_counts

    probabilities = counts[counts > 0] / tokens.size
    # Subtracting from 0 gives 0.0 rather than -0.0 for a single distinct token.
    return float(0.0 - (probabilities * np.log2(probabilities)).sum())


# ---- input checks


def _check_val_fraction(val_fraction: float) -> None:
    is_number = isinstance(val_fraction, numbers.Real) and not isinstance(val_fraction, bool)
    if not is_number or not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}"
        )


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern or Path(pattern).is_absolute():
        raise ValueError(
            f"pattern must be a non-empty glob relative to the corpus folder, such as '**/*.txt', "
            f"got {pattern!r}"
        )


def _match_files(
    root: Path, pattern: str, excluded_dirs: frozenset[str]
) -> list[tuple[str, os.stat_result]]:
    """List (relative POSIX path, stat) of the regular files under `root` that match `pattern`."""
    files = []
    for file in root.glob(pattern):
        relative = file.relative_to(root)
        if excluded_dirs.intersection(relative.parts[:-1]) or not file.is_file():
            continue
        files.append((relative.as_posix(), file.stat()))
    if not files:
        raise ValueError(f"pattern {pattern!r} matched no files in corpus folder {root}")
    files.sort(key=lambda item: item[0])
    return files


# ---- folders (split by file)


def _load_folder(
    root: Path,
    files: Sequence[tuple[str, os.stat_result]],
    name: str,
    pattern: str,
    val_fraction: float,
    cache_dir: Path | None,
) -> Corpus:
    documents = [(relative, stat) for relative, stat in files if stat.st_size > 0]
    if not documents:
        raise ValueError(
            f"corpus folder {root} is empty: all {len(files)} files matching {pattern!r} are empty"
        )

    in_val = [is_validation_file(relative, val_fraction) for relative, _ in documents]
    val_files = tuple(relative for (relative, _), is_val in zip(documents, in_val) if is_val)
    train_files = tuple(relative for (relative, _), is_val in zip(documents, in_val) if not is_val)
    for split_name, split_files in (("validation", val_files), ("training", train_files)):
        if not split_files:
            # A file that is not text is the more useful message: read them first.
            for relative, _ in documents:
                for _ in token_files.read_text_chunks(root / relative):
                    pass
            raise ValueError(
                f"the {split_name} split of corpus folder {root} is empty: none of its "
                f"{len(documents)} non-empty files hash into it at val_fraction={val_fraction}. "
                "Add files, change val_fraction, or pass a single file to split by position"
            )

    corpus = functools.partial(
        Corpus, name=name, num_files=len(documents), split="by_file", source=str(root),
        train_files=train_files, val_files=val_files,
    )

    if cache_dir is None:
        train_buffer, val_buffer = io.BytesIO(), io.BytesIO()
        _write_folder_splits(root, train_files, val_files, train_buffer, val_buffer)
        return corpus(train=_frombuffer(train_buffer), val=_frombuffer(val_buffer))

    file_states = [[relative, stat.st_size, stat.st_mtime_ns] for relative, stat in documents]
    fingerprint = _fingerprint(file_states)
    key = _cache_key(source=str(root), pattern=pattern, val_fraction=val_fraction)
    cache = _CacheFiles(cache_dir, name, key, suffixes=("train", "val"))
    if not cache.is_up_to_date(fingerprint):
        with cache.building(fingerprint) as (train_file, val_file):
            _write_folder_splits(root, train_files, val_files, train_file, val_file)
    train, val = cache.memmaps()
    return corpus(train=train, val=val, cache_files=cache.token_paths())


def _write_folder_splits(root, train_files, val_files, train_output, val_output) -> None:
    for relative_paths, output in ((train_files, train_output), (val_files, val_output)):
        writer = TokenWriter(output)
        for relative in relative_paths:
            writer.write_text_file(root / relative)


# ---- single files (split by position)


def _load_token_file(source: Path, val_fraction: float) -> Corpus:
    tokens = token_files.open_token_file(source)
    num_train = _num_train_tokens(len(tokens), val_fraction, source)
    return Corpus(
        name=source.stem, train=tokens[:num_train], val=tokens[num_train:], num_files=1,
        split="by_position", source=str(source), cache_files=(str(source),),
    )


def _load_text_file(source: Path, val_fraction: float, cache_dir: Path | None) -> Corpus:
    stat = source.stat()
    if stat.st_size == 0:
        raise ValueError(
            f"corpus file {source} is empty, but the corpus must contain at least one token"
        )
    # The split is checked after reading, so that a short binary file is reported as not text.
    if cache_dir is None:
        buffer = io.BytesIO()
        TokenWriter(buffer).write_text_file(source)
        tokens = _frombuffer(buffer)
        cache_files = ()
    else:
        fingerprint = _fingerprint([stat.st_size, stat.st_mtime_ns])
        # The token file contains the whole text and the split is cut from it as views, so one
        # cache serves every val_fraction.
        key = _cache_key(source=str(source))
        cache = _CacheFiles(cache_dir, source.name, key, suffixes=("tokens",))
        if not cache.is_up_to_date(fingerprint):
            with cache.building(fingerprint) as (tokens_file,):
                TokenWriter(tokens_file).write_text_file(source)
        (tokens,) = cache.memmaps()
        cache_files = cache.token_paths()

    # The file may have changed size since it was listed, so split on what was actually read.
    num_train = _num_train_tokens(len(tokens), val_fraction, source)
    return Corpus(
        name=source.name, train=tokens[:num_train], val=tokens[num_train:], num_files=1,
        split="by_position", source=str(source), cache_files=cache_files,
    )


def _num_train_tokens(num_tokens: int, val_fraction: float, source: Path) -> int:
    num_val = math.floor(val_fraction * num_tokens)
    if num_val == 0:
        raise ValueError(
            f"the validation split of {source} is empty: val_fraction={val_fraction} of "
            f"{num_tokens} tokens rounds down to 0. Raise val_fraction to at least "
            f"{1 / num_tokens:.3g} or use more text"
        )
    return num_tokens - num_val


def _frombuffer(buffer: io.BytesIO) -> np.ndarray:
    return np.frombuffer(buffer.getvalue(), dtype=TOKEN_DTYPE)


# ---- token-file cache


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value).encode("utf-8")).hexdigest()


def _cache_key(**settings) -> str:
    return _fingerprint({"version": CACHE_FORMAT_VERSION, **settings})[:16]


class _CacheFiles:
    """Token files `<name>-<key>.<suffix>.bin` under `cache_dir`, described by `<name>-<key>.json`.

    The JSON manifest is written last and records the source fingerprint and the size of each
    token file, so a cache counts as up to date only if a build finished for the current sources.
    NOTE: the fingerprint uses file sizes and modification times, so an edit that keeps a file's
    size and restores its modification time is not noticed.
    """

    def __init__(self, cache_dir: Path, name: str, key: str, suffixes: tuple[str, ...]):
        stem = f"{name}-{key}"
        self.manifest_path = cache_dir / f"{stem}.json"
        self.token_file_paths = [cache_dir / f"{stem}.{suffix}.bin" for suffix in suffixes]

    def is_up_to_date(self, fingerprint: str) -> bool:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            sizes = [path.stat().st_size for path in self.token_file_paths]
        except (OSError, ValueError):
            return False
        return manifest.get("fingerprint") == fingerprint and manifest.get("sizes") == sizes

    @contextlib.contextmanager
    def building(self, fingerprint: str):
        """Open the token files for writing and record `fingerprint` once all are complete."""
        self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
        # The old token files are about to be replaced one by one, so they stop counting as a
        # finished build now.
        self.manifest_path.unlink(missing_ok=True)
        with contextlib.ExitStack() as stack:
            outputs = [token_files.atomic_output(path) for path in self.token_file_paths]
            yield [stack.enter_context(output) for output in outputs]

        manifest = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "sizes": [path.stat().st_size for path in self.token_file_paths],
        }
        with token_files.atomic_output(self.manifest_path) as file:
            file.write(json.dumps(manifest).encode("utf-8"))

    def memmaps(self) -> list[np.ndarray]:
        return [token_files.memmap_tokens(path) for path in self.token_file_paths]

    def token_paths(self) -> tuple[str, ...]:
        return tuple(str(path) for path in self.token_file_paths)
