"""Probes and analyses for experiments from the literature: attention patterns, associative
memories, losses split by position type, and the implicit attention matrix of Mamba."""

from experiments.implicit_attention import implicit_attention, segment_sum
from experiments.probes import (
    associative_memory_recall,
    induction_score,
    previous_token_score,
    split_loss,
)

__all__ = [
    "associative_memory_recall",
    "implicit_attention",
    "induction_score",
    "previous_token_score",
    "segment_sum",
    "split_loss",
]
