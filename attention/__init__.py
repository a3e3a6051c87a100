"""The Transformer baseline: causal attention, Transformer++ and classic blocks, Llama import."""

from attention.attention import CausalSelfAttention, KeyValueCache
from attention.config import TransformerConfig
from attention.pretrained import from_pretrained
from attention.transformer import TransformerBlock, attention_weights, build_language_model

__all__ = [
    "CausalSelfAttention",
    "KeyValueCache",
    "TransformerBlock",
    "TransformerConfig",
    "attention_weights",
    "build_language_model",
    "from_pretrained",
]
