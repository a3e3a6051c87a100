"""Birth of a Transformer (Bietti et al. 2023): a bigram language whose triggers repeat in context.

A two-layer Transformer first learns the global bigram statistics, then an induction mechanism
(a previous-token head in layer 1, an induction head in layer 2) that copies the token that
followed a trigger earlier in the sequence. The probes of `experiments/birth.py` run at every
evaluation and their plots show both phases:

    python train.py --config=configs/birth_transformer.py --workdir=runs/birth_transformer
    python train.py --config=configs/birth_transformer.py:mamba --workdir=runs/birth_mamba
    python -m experiments.birth --workdirs=runs/birth_transformer,runs/birth_mamba \\
        --output_dir=runs/results/birth

Variants are joined by commas (`:attention_only,frozen_embeddings`). "transformer" is the default
architecture here, and "mamba" and "nonselective" (time-invariant Mamba) the others.
"attention_only" drops the feed-forward sublayers. "frozen_embeddings" keeps the embedding and
output head at their random initial values, and "frozen_first_layer" does so for the whole first
block, which leaves the first layer no way to learn the previous-token head. "simplified" is the
simplified model of Bietti et al.: attention only, with the embeddings, output head, W_V and W_O
of the first layer and W_V of the second frozen. The three set optimizer.frozen_parameters, so
none of them combine.
"tiny" runs in seconds, for tests, and "paper" has the sizes of Bietti et al. (vocabulary 64,
length 256, width 256). The task fields are those of
`data.synthetic.bietti_bigram_batch`; the other fields are documented in `training/config.py` and
`training/tasks.py`.
"""

import ml_collections

from training.tasks import synthetic_task_config

# Keyword arguments of data.synthetic.bietti_bigram_batch: 64 tokens, 3 triggers per sequence.
# The triggers are the 3 most likely tokens in every sequence (`fixed_triggers`). With triggers
# drawn afresh per sequence, no induction head formed in 1095 steps. At length 128, 94% of those
# sequences still repeat a trigger, but repeated triggers are 3.1% of the positions, against 5.7%
# with fixed triggers (measured over 4096 sequences).
TASK_OPTIONS = {"vocab_size": 64, "num_triggers": 3, "fixed_triggers": True}

# Variant name -> overrides of the default (CPU) config, as dotted field paths.
VARIANTS = {
    "": {
        # An untied output head, so that the global bigram table is not forced to be symmetric.
        "model.tie_embeddings": False,
        # Fixed absolute positions, as in Bietti et al., whose first-layer head finds the previous
        # token through them. With RoPE the induction head formed too, but later: in-context loss
        # 0.67 at step 1000, against 0.35 at step 900 here.
        "transformer": {"model.num_heads": 1, "model.positions": "sinusoidal"},
        "data.seq_len": 128, "data.batch_size": 64,
        "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 50,
        "optimizer.weight_decay": 0.0,
        # In an 800-step run the bigram loss levelled off by step 200, and the induction head
        # formed between steps 400 and 550.
        "train.num_steps": 1000, "train.log_every": 50, "train.eval_every": 25,
        "train.eval_batches": 4, "train.checkpoint_every": 200, "train.probes": "attention",
    },
    "transformer": {},
    "mamba": {},
    "nonselective": {"model.selective": False},
    "attention_only": {"model.attention_only": True},
    "frozen_embeddings": {"optimizer.frozen_parameters": r"^(embedding|head)/"},
    "frozen_first_layer": {"optimizer.frozen_parameters": r"^blocks/0/"},
    # The simplified model of Bietti et al. (Section 4.2): attention only, with the embeddings,
    # the output head, W_V and W_O of the first layer and W_V of the second kept at their random
    # initial values. The queries and keys of both layers and the second W_O are trained.
    "simplified": {
        "model.attention_only": True,
        "optimizer.frozen_parameters": (r"^(embedding|head)/|^blocks/0/attention/(value|out)_proj/"
                                        r"|^blocks/1/attention/value_proj/"),
    },
    "tiny": {
        # Mamba runs the sequential scan, which compiles fastest on CPU (the chunked scan of a
        # paper variant takes about a minute).
        "mamba": {"model.scan": "sequential"},
        "model.d_model": 16, "data.seq_len": 32, "data.batch_size": 8,
        "data.task_options.vocab_size": 16, "model.vocab_size": 16,
        "optimizer.warmup_steps": 2,
        "train.num_steps": 4, "train.log_every": 2, "train.eval_every": 2,
        "train.eval_batches": 2, "train.checkpoint_every": 2,
    },
    # NOTE: vocabulary, length and width follow Bietti et al. 2023. The batch size, step count and
    # optimizer (AdamW here) are our choice.
    "paper": {
        "model.d_model": 256, "data.seq_len": 256, "data.batch_size": 64,
        "train.num_steps": 5000, "train.eval_every": 50, "train.checkpoint_every": 1000,
    },
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Return the config of `variant`: "" or names of VARIANTS joined by commas."""
    # "nonselective" is a Mamba without selection, so it needs no ":mamba".
    names = [name for name in variant.split(",") if name]
    default_architecture = "mamba" if "nonselective" in names else "transformer"
    return synthetic_task_config("bietti_bigram", TASK_OPTIONS, variant, VARIANTS,
                                 default_architecture=default_architecture)
