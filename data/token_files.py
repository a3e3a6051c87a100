"""Token files: little-endian uint16 ids, streamed from text files and memory-mapped back.

Format of a token file (`.bin`): a flat sequence of token ids, each a little-endian unsigned 16-bit
integer, with no header. Ids 0..255 are bytes and 256 is the document separator.
"""

import codecs
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data.tokenizer import SEPARATOR, VOCAB_SIZE

TOKEN_DTYPE = np.dtype("<u2")
READ_CHUNK_BYTES = 1 << 20
_SEPARATOR_BYTES = np.array([SEPARATOR], dtype=TOKEN_DTYPE).tobytes()


class TokenWriter:
    """Append documents, as byte ids joined by the separator, to a binary file object."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.num_tokens = 0
        self.num_documents = 0

    def write_text_file(self, path: Path) -> None:
        """Stream the UTF-8 text file at `path` in as one document, after a separator if needed."""
        if self.num_documents:
            self.file.write(_SEPARATOR_BYTES)
            self.num_tokens += 1
        for chunk in read_text_chunks(path):
            self.file.write(np.frombuffer(chunk, dtype=np.uint8).astype(TOKEN_DTYPE).tobytes())
            self.num_tokens += len(chunk)
        self.num_documents += 1


def read_text_chunks(path: Path, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the bytes of `path` in chunks, raising ValueError on a NUL byte or invalid UTF-8.

    The check runs chunk by chunk with an incremental decoder, so a large file is never held in
    memory whole. The error names the byte offset of the first bad byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            nul_index = chunk.find(b"\x00")
            if nul_index >= 0:
                problem = f"NUL byte at byte offset {offset + nul_index}"
                raise ValueError(_not_text_message(path, problem))
            _check_utf8(decoder, chunk, offset, path, final=False)
            yield chunk
            offset += len(chunk)
    _check_utf8(decoder, b"", offset, path, final=True)


def _check_utf8(decoder, chunk: bytes, offset: int, path: Path, *, final: bool) -> None:
    # Bytes of an incomplete character carried over from the previous chunk come first in the
    # decoder's input, so an error index counts from `offset - len(pending)`.
    pending, _ = decoder.getstate()
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError as error:
        bad_offset = offset - len(pending) + error.start
        problem = f"invalid UTF-8 at byte offset {bad_offset}"
        raise ValueError(_not_text_message(path, problem)) from None


def _not_text_message(path: Path, problem: str) -> str:
    return (
        f"{path} is not a text file ({problem}). Text input must be UTF-8 without NUL bytes. "
        "Exclude the file with `pattern`, or pass pre-tokenized data as a .bin token file"
    )


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` and rename it to `path` only if the block succeeds.

    A failed or interrupted block deletes the temporary file, so `path` is either absent, its old
    version, or complete. A process killed outright can leave a `*.tmp` file behind, never a
    partial file under `path`.
    """
    file_descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=path.name + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(file_descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def memmap_tokens(path: Path) -> np.ndarray:
    """Memory-map a token file read-only. An empty file gives an empty in-memory array."""
    if path.stat().st_size == 0:
        # np.memmap cannot map a zero-length file.
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def open_token_file(path: Path) -> np.ndarray:
    """Memory-map a user's `.bin` token file after checking its size and that every id is valid."""
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise ValueError(
            f"token file {path} has {size} bytes, which is not a whole number of uint16 ids. "
            "A .bin token file must contain little-endian uint16 ids with no header"
        )
    if size == 0:
        raise ValueError(
            f"token file {path} is empty, but the corpus must contain at least one token"
        )

    tokens = memmap_tokens(path)
    for start in range(0, len(tokens), READ_CHUNK_BYTES):
        chunk_max = int(tokens[start:start + READ_CHUNK_BYTES].max())
        if chunk_max >= VOCAB_SIZE:
            raise ValueError(
                f"token file {path} contains id {chunk_max}, but valid ids are 0..{VOCAB_SIZE - 1} "
                f"(bytes 0..255 and the separator {SEPARATOR})"
            )
    return tokens
