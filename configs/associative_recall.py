"""Multi-query associative recall (Arora et al. 2023, "Zoology"): return the value of each queried key.

Train the CPU-sized default (Mamba, 2 layers, d_model 64, 8 key-value pairs in sequences of 64):

    python train.py --config=configs/associative_recall.py --workdir=runs/recall_mamba
    python train.py --config=configs/associative_recall.py:transformer --workdir=runs/recall_tf

Variants are joined by commas (`:transformer,tiny`). "mamba" is the default architecture, and
"transformer" the other one. "nonselective" is Mamba with dt, B and C independent of the input.
"tiny" runs in seconds, for tests. "paper" has the Zoology sizes (vocabulary 8192, 64 pairs in
sequences of 512) and needs a GPU. The task fields are those of `data.synthetic.associative_recall_batch`; the other fields are
documented in `training/config.py` and `training/tasks.py`.
"""

import ml_collections

from training.tasks import synthetic_task_config

# Keyword arguments of data.synthetic.associative_recall_batch: keys from [0, 32), values from
# [32, 64), every key queried once.
TASK_OPTIONS = {"vocab_size": 64, "num_kv_pairs": 8}

# Variant name -> overrides of the default (CPU) config, as dotted field paths.
VARIANTS = {
    "": {
        "data.seq_len": 64, "data.batch_size": 32,
        "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 100,
        "optimizer.weight_decay": 0.0,
        "train.num_steps": 2000, "train.log_every": 50, "train.eval_every": 250,
        "train.eval_batches": 8, "train.checkpoint_every": 250,
    },
    "mamba": {},
    "transformer": {},
    "nonselective": {"model.selective": False},
    "tiny": {
        # Mamba runs the sequential scan, which compiles fastest on CPU (the chunked scan of a
        # paper variant takes about a minute).
        "mamba": {"model.scan": "sequential"},
        "model.d_model": 16, "data.seq_len": 16, "data.batch_size": 8,
        "data.task_options.num_kv_pairs": 2, "data.task_options.vocab_size": 16,
        "model.vocab_size": 16,
        "optimizer.warmup_steps": 2,
        "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 2,
        "train.eval_batches": 2, "train.checkpoint_every": 2,
    },
    # NOTE: vocabulary, pairs and length follow the Zoology MQAR setup as we understand it. The
    # model width, batch size, step count and learning rate are our choice for a GPU run.
    "paper": {
        "mamba": {"model.scan": "chunked"},
        "model.d_model": 128, "model.vocab_size": 8192,
        "data.task_options.vocab_size": 8192, "data.task_options.num_kv_pairs": 64,
        "data.seq_len": 512, "data.batch_size": 64, "optimizer.learning_rate": 1e-3,
        "train.num_steps": 20000, "train.log_every": 500, "train.eval_every": 1000,
        "train.eval_batches": 16, "train.checkpoint_every": 2000,
    },
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Return the config of `variant`: "" or names of VARIANTS joined by commas."""
    return synthetic_task_config("associative_recall", TASK_OPTIONS, variant, VARIANTS)
