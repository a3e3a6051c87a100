"""Selective copying (Gu & Dao 2023, "Mamba"): output the data tokens scattered among noise, in order.

Train the CPU-sized default (Mamba, 2 layers, d_model 64, 8 data tokens in sequences of 128) and
its time-invariant contrast, then compare their accuracy:

    python train.py --config=configs/selective_copying.py --workdir=runs/copying_mamba
    python train.py --config=configs/selective_copying.py:nonselective \\
        --workdir=runs/copying_nonselective
    python -m experiments.extrapolate --workdirs=runs/copying_mamba,runs/copying_nonselective \\
        --lengths=128 --output_dir=runs/results/selective_copying

Variants, joined by commas (`:transformer,tiny`): "mamba" (the default architecture),
"transformer", "nonselective" (Mamba with dt, B and C independent of the input, the S4D-like
contrast), "tiny" (seconds, for tests) and "paper" (16 data tokens in sequences of 4096, for a GPU).
The task fields are those of `data.synthetic.selective_copying_batch`; the other fields are
documented in `training/config.py` and `training/tasks.py`.
"""

import ml_collections

from training.tasks import synthetic_task_config

# Keyword arguments of data.synthetic.selective_copying_batch: token 0 is noise, token 15 the
# marker, tokens 1 .. 14 are data.
TASK_OPTIONS = {"vocab_size": 16, "num_data_tokens": 8}

# Variant name -> overrides of the default (CPU) config, as dotted field paths.
VARIANTS = {
    "": {
        "data.seq_len": 128, "data.batch_size": 16,
        "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 100,
        "optimizer.weight_decay": 0.0,
        # 6000 steps: about 10 minutes for Mamba on 2 idle CPU cores.
        "train.num_steps": 6000, "train.log_every": 50, "train.eval_every": 500,
        "train.eval_batches": 8, "train.checkpoint_every": 500,
    },
    "mamba": {},
    "transformer": {},
    "nonselective": {"model.selective": False},
    "tiny": {
        # Mamba runs the sequential scan, which compiles fastest on CPU (the chunked scan of a
        # paper variant takes about a minute).
        "mamba": {"model.scan": "sequential"},
        "model.d_model": 16, "data.seq_len": 32, "data.batch_size": 8,
        "data.task_options.num_data_tokens": 4,
        "optimizer.warmup_steps": 2,
        "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 2,
        "train.eval_batches": 2, "train.checkpoint_every": 2,
    },
    # The task sizes of the Mamba paper's selective copying experiment (16 data tokens, vocabulary
    # 16, length 4096). NOTE: the batch size, step count and learning rate are our choice.
    "paper": {
        "mamba": {"model.scan": "chunked"},
        "data.seq_len": 4096, "data.batch_size": 64, "data.task_options.num_data_tokens": 16,
        "optimizer.learning_rate": 1e-3,
        "train.num_steps": 20000, "train.log_every": 500, "train.eval_every": 1000,
        "train.eval_batches": 16, "train.checkpoint_every": 2000,
    },
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Return the config of `variant`: "" or names of VARIANTS joined by commas."""
    return synthetic_task_config("selective_copying", TASK_OPTIONS, variant, VARIANTS)
