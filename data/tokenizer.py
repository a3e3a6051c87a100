"""Byte-level tokenizer: every UTF-8 byte is one token, plus one document separator."""

import numpy as np

SEPARATOR = 256
VOCAB_SIZE = 257
# Text that `ByteTokenizer.decode` writes in place of each separator id. It sits on its own line
# so that document boundaries stand out in generated samples.
SEPARATOR_TEXT = "\n<|sep|>\n"


class ByteTokenizer:
    """Tokenizer between text and its UTF-8 bytes (ids 0..255), with id 256 separating documents.

    No vocabulary file is needed and every text is representable. Ids are stored as uint16 because
    the vocabulary has 257 entries.
    """

    SEPARATOR = SEPARATOR
    vocab_size = VOCAB_SIZE

    def encode(self, text: str | bytes) -> np.ndarray:
        """Encode `text` (str as UTF-8, or raw bytes) into a 1-D uint16 array of byte ids."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        elif not isinstance(text, (bytes, bytearray, memoryview)):
            raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
        return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Decode byte ids to text, writing `SEPARATOR_TEXT` for each separator.

        Each run of bytes between separators is decoded as UTF-8 with errors="replace", so an
        invalid or truncated byte sequence becomes U+FFFD instead of raising.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        invalid = (ids < 0) | (ids > SEPARATOR)
        if invalid.any():
            raise ValueError(
                f"token id {int(ids[invalid][0])} is out of range. Byte ids are 0..255 and the "
                f"separator is {SEPARATOR}"
            )

        separator_positions = np.flatnonzero(ids == SEPARATOR)
        pieces = []
        start = 0
        for position in separator_positions:
            pieces.append(_decode_bytes(ids[start:position]))
            start = position + 1
        pieces.append(_decode_bytes(ids[start:]))
        return SEPARATOR_TEXT.join(pieces)


def _decode_bytes(byte_ids: np.ndarray) -> str:
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
