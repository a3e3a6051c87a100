"""Training of the byte-level language models: optimizer, pure steps, checkpoints, metrics, loop.

From a notebook:

    from training import load_run
    model, config = load_run("runs/mamba")  # nnx model with the latest checkpoint's parameters

The README's "Training" section shows one training step from a notebook.
"""

from training.checkpoint import load_run
from training.config import load_config_file
from training.loop import TrainingDivergedError, initial_train_state, train_and_evaluate
from training.steps import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "TrainState",
    "TrainingDivergedError",
    "create_train_state",
    "eval_step",
    "initial_train_state",
    "load_config_file",
    "load_run",
    "train_and_evaluate",
    "train_step",
]
