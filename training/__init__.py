"""Training of the byte-level language models: optimizer, pure steps, checkpoints, metrics, loop.

From a notebook:

    from training import load_run
    model, config = load_run("runs/mamba")  # nnx model with the latest checkpoint's parameters
"""

from training.checkpoint import load_run
from training.loop import TrainingDivergedError, train_and_evaluate
from training.steps import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "TrainState",
    "TrainingDivergedError",
    "create_train_state",
    "eval_step",
    "load_run",
    "train_and_evaluate",
    "train_step",
]
