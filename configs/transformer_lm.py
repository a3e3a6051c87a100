"""Byte-level Transformer++ language model with the parameter count of `configs/mamba_lm.py`.

Run the CPU-sized default (about 1 minute on 2 idle CPU cores):

    python train.py --config=configs/transformer_lm.py --workdir=runs/transformer

Variants (`--config=configs/transformer_lm.py:NAME`): "" (the CPU default), "tiny" (seconds, for
tests), "small" and "medium" (for a GPU or TPU). Each variant has the parameter count (within 10%)
and the `data`, `optimizer` and `train` settings of the Mamba variant of the same name. A
Transformer++ block has about twice the parameters of a Mamba block, so it has half the layers.
The `data`, `optimizer` and `train` fields are documented in `training/config.py`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from training.config import apply_variant, default_training_config, with_training_variants

# Variant name -> model overrides of the default (CPU) config, as dotted field paths; the
# data, optimizer and train overrides come from training.config.TRAINING_VARIANTS.
VARIANTS = with_training_variants({
    "": {},
    "tiny": {
        "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.ffn_dim": 112,
    },
    "small": {
        "model.d_model": 768, "model.num_layers": 12, "model.num_heads": 12, "model.ffn_dim": None,
        "model.dtype": "bfloat16",
    },
    "medium": {
        "model.d_model": 1024, "model.num_layers": 24, "model.num_heads": 16, "model.ffn_dim": None,
        "model.dtype": "bfloat16",
    },
})


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Return the config of `variant` (see the module docstring for the names)."""
    config = default_training_config()

    config.model = ml_collections.ConfigDict()
    config.model.architecture = "transformer"
    # Byte tokens 0..255 plus the document separator 256.
    config.model.vocab_size = 257
    # Width of the residual stream, in channels.
    config.model.d_model = 128
    # Transformer blocks (each about 12 * d_model**2 parameters with the default ffn_dim).
    config.model.num_layers = 2
    # Query heads.
    config.model.num_heads = 4
    # Key/value heads (grouped-query attention when fewer than num_heads); None: num_heads.
    config.model.num_kv_heads = placeholder(int)
    # Channels per head; None: d_model // num_heads.
    config.model.head_dim = placeholder(int)
    # Feed-forward width in channels; None: the flavour's default (8/3 * d_model for SwiGLU,
    # rounded up to a multiple of 8, which is 344 here). 416 brings the parameter count to within
    # 4% of the Mamba default's.
    config.model.ffn_dim = placeholder(int)
    config.model.ffn_dim = 416
    # "transformer++" (RMSNorm, SwiGLU, RoPE, no biases) or "classic" (GPT-2 style).
    config.model.flavour = "transformer++"
    # Position encoding: "rope", "sinusoidal" or "none".
    config.model.positions = "rope"
    # RoPE frequencies are rope_base ** (-2i / head_dim).
    config.model.rope_base = 10000.0
    # RMSNorm epsilon, added to the mean of squares.
    config.model.norm_eps = 1e-5
    # The output head reuses the embedding table (no extra parameters).
    config.model.tie_embeddings = True
    # Embedding rows are padded up to a multiple of this many (padded logits are dropped).
    config.model.pad_vocab_size_multiple = 8
    # Maximum sequence length in tokens with sinusoidal positions (unused by RoPE).
    config.model.max_len = 4096
    # Compute dtype, "float32" or "bfloat16"; norms and softmax run in float32 either way.
    config.model.dtype = "float32"
    # Parameter storage dtype; keep float32 for training.
    config.model.param_dtype = "float32"

    return apply_variant(config, variant, VARIANTS)
