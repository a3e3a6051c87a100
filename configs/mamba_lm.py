"""Byte-level Mamba language model on the Python standard library's source.

Run the CPU-sized default (about 2 minutes on 2 idle CPU cores):

    python train.py --config=configs/mamba_lm.py --workdir=runs/mamba

Variants (`--config=configs/mamba_lm.py:NAME`): "" (the CPU default), "tiny" (seconds, for
tests), "small" and "medium" (for a GPU or TPU). Any field can be overridden, for example
`--config.train.num_steps=500`. The `data`, `optimizer` and `train` fields are documented in
`training/config.py`. `configs/transformer_lm.py` uses the same ones, so runs of the two
architectures have the same budget.
"""

import ml_collections

from training.config import apply_variant, default_training_config, with_training_variants

# Variant name -> model overrides of the default (CPU) config, as dotted field paths; the
# data, optimizer and train overrides come from training.config.TRAINING_VARIANTS.
VARIANTS = with_training_variants({
    "": {},
    "tiny": {
        "model.d_model": 32, "model.num_layers": 2, "model.d_state": 4,
    },
    # About 90M parameters: the width of the 130M model of the Mamba paper, with 24 layers.
    "small": {
        "model.d_model": 768, "model.num_layers": 24, "model.scan": "chunked",
        "model.dtype": "bfloat16",
    },
    # About 320M parameters: the 370M model of the Mamba paper (d_model 1024, 48 layers).
    "medium": {
        "model.d_model": 1024, "model.num_layers": 48, "model.scan": "chunked",
        "model.dtype": "bfloat16",
    },
})


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Return the config of `variant` (see the module docstring for the names)."""
    config = default_training_config()

    config.model = ml_collections.ConfigDict()
    config.model.architecture = "mamba"
    # Byte tokens 0..255 plus the document separator 256.
    config.model.vocab_size = 257
    # Width of the residual stream, in channels.
    config.model.d_model = 128
    # Mamba blocks (each about 6 * d_model**2 parameters, half a Transformer block).
    config.model.num_layers = 4
    # SSM state size N per channel.
    config.model.d_state = 16
    # Expansion factor: the mixer works on expand * d_model channels.
    config.model.expand = 2
    # Kernel width of the causal depthwise convolution, in time steps.
    config.model.d_conv = 4
    # Rank of the dt projection; "auto" is ceil(d_model / 16).
    config.model.dt_rank = "auto"
    # Selective scan implementation: "associative", "sequential", "chunked" or "cpu_kernel".
    # "cpu_kernel" is the C++ kernel of ssm/cpu_kernel.py, built on first use with the machine's
    # C++ compiler. Without one, and on GPUs and TPUs, it runs "sequential". On 2 CPU cores
    # "sequential" measured 2 to 4 times faster per step than the other two JAX scans at this
    # size, and "cpu_kernel" about twice as fast as "sequential" (README, "Mamba against the
    # Transformer").
    config.model.scan = "cpu_kernel"
    # Time steps per chunk when scan is "chunked".
    config.model.chunk_size = 256
    # The output head reuses the embedding table (no extra parameters).
    config.model.tie_embeddings = True
    # Embedding rows are padded up to a multiple of this many (padded logits are dropped).
    config.model.pad_vocab_size_multiple = 8
    # RMSNorm epsilon, added to the mean of squares.
    config.model.norm_eps = 1e-5
    # Compute dtype, "float32" or "bfloat16"; the scan and norms run in float32 either way.
    config.model.dtype = "float32"
    # Parameter storage dtype; keep float32 for training.
    config.model.param_dtype = "float32"
    # False makes dt, B and C independent of the input (an S4D-like, non-selective contrast).
    config.model.selective = True

    return apply_variant(config, variant, VARIANTS)
