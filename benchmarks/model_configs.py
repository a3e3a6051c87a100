"""Model configs shared by the benchmarks: a Mamba and a Transformer++ with matched parameters."""

from typing import Any

from flax import nnx

from data.tokenizer import VOCAB_SIZE
from models.registry import build_model, count_parameters


def mamba_config(*, d_model: int, num_layers: int, d_state: int = 16, expand: int = 2,
                 scan: str = "associative", chunk_size: int = 256) -> dict[str, Any]:
    """Return a byte-level Mamba model config for `models.registry.build_model`."""
    return {"architecture": "mamba", "vocab_size": VOCAB_SIZE, "d_model": d_model,
            "num_layers": num_layers, "d_state": d_state, "expand": expand, "scan": scan,
            "chunk_size": chunk_size}


def transformer_config(*, d_model: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    """Return a byte-level Transformer++ (RoPE, SwiGLU, RMSNorm) config for `build_model`."""
    return {"architecture": "transformer", "vocab_size": VOCAB_SIZE, "d_model": d_model,
            "num_layers": num_layers, "num_heads": num_heads}


def matched_transformer_config(mamba: dict[str, Any], *, num_heads: int) -> dict[str, Any]:
    """Return the Transformer++ of Mamba's width whose layer count best matches its parameters."""
    d_model = mamba["d_model"]
    one_layer = count_parameters(transformer_config(d_model=d_model, num_layers=1,
                                                    num_heads=num_heads))
    two_layers = count_parameters(transformer_config(d_model=d_model, num_layers=2,
                                                     num_heads=num_heads))
    per_layer = two_layers - one_layer
    shared = one_layer - per_layer
    num_layers = max(1, round((count_parameters(mamba) - shared) / per_layer))
    return transformer_config(d_model=d_model, num_layers=num_layers, num_heads=num_heads)


def build(config: dict[str, Any], seed: int = 0) -> nnx.Module:
    """Build the `LanguageModel` of `config` with fresh parameters."""
    return build_model(config, rngs=nnx.Rngs(seed))


def describe(config: dict[str, Any]) -> str:
    """Return a short name of a benchmark model config with its parameter count."""
    millions = count_parameters(config) / 1e6
    return (f"{config['architecture']} d_model={config['d_model']} "
            f"layers={config['num_layers']} ({millions:.2f}M parameters)")
