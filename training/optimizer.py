"""AdamW with a warmup-cosine learning rate, global-norm clipping and a path-based decay mask."""

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from training.freezing import freeze_parameters

# Parameters with these names get no weight decay: biases, norm scales (and norm biases), Mamba's
# A_log and D, and embedding tables. Decaying A_log or D would pull the SSM towards no memory and
# no skip connection, and decaying the embeddings shrinks rare tokens' rows towards zero.
NO_DECAY_NAMES = frozenset({"bias", "scale", "A_log", "D", "embedding"})


def _parameter_name(path: tuple) -> str:
    """Return the last named key of a pytree path, skipping index keys."""
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name != "value":
            return name
    raise ValueError(f"parameter path {jax.tree_util.keystr(path)} has no named key")


def weight_decay_mask(params: Any) -> Any:
    """Return a pytree of bools like `params`: True where a parameter gets weight decay.

    Matrices (and higher-rank kernels) get decay unless their name is in `NO_DECAY_NAMES`;
    vectors and scalars never do.
    """
    def decays(path, leaf) -> bool:
        return leaf.ndim >= 2 and _parameter_name(path) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Return the learning rate per optimizer step: linear warmup from 0, then cosine decay.

    With `late_phase_step` > 0 the warmup and decay end at that step, and from it on the learning
    rate is the constant `late_phase_learning_rate`.
    """
    peak = config.learning_rate
    late_step = config.late_phase_step
    decay_end = min(late_step, num_steps) if late_step > 0 else num_steps
    warmup_steps = min(config.warmup_steps, decay_end)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(decay_end, warmup_steps + 1),
        end_value=peak * config.final_learning_rate_fraction)
    if late_step <= 0:
        return schedule
    return optax.join_schedules(
        [schedule, optax.constant_schedule(config.late_phase_learning_rate)], [late_step])


def build_optimizer(config: ml_collections.ConfigDict | Mapping[str, Any], num_steps: int
                    ) -> optax.GradientTransformation:
    """Return clip-by-global-norm followed by AdamW, for a run of `num_steps` optimizer steps.

    Gradient accumulation is not part of the optimizer: `training.steps.train_step` averages the
    gradients of the micro-batches before calling it once per optimizer step. An optional field
    `frozen_parameters` (a regular expression over parameter paths, see `training.freezing`)
    keeps the matching parameters at their initial values.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate=learning_rate_schedule(config, num_steps),
            b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
            mask=weight_decay_mask),
    )
    return freeze_parameters(tx, config.get("frozen_parameters", ""))
