"""Byte-level data: tokenizer, text corpora as memory-mapped token arrays, training windows."""

from data.corpus import Corpus, is_validation_file, load_corpus, unigram_entropy_bits
from data.tokenizer import SEPARATOR, SEPARATOR_TEXT, VOCAB_SIZE, ByteTokenizer
from data.windows import train_batch, validation_batches

__all__ = [
    "SEPARATOR",
    "SEPARATOR_TEXT",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "Corpus",
    "is_validation_file",
    "load_corpus",
    "train_batch",
    "unigram_entropy_bits",
    "validation_batches",
]
