"""Text generation: token sampling and a batched decode loop compiled with `jax.jit`."""

from generation.decode import GenerationResult, decode_loop, generate, left_pad, prefill
from generation.sampling import SamplingConfig, filter_logits, sample_tokens

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "decode_loop",
    "filter_logits",
    "generate",
    "left_pad",
    "prefill",
    "sample_tokens",
]
