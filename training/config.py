"""Training fields shared by every config file, variant overrides, and config validation.

A config has four sections: `model` (architecture and model dataclass fields, written by each file
in `configs/`), `data`, `optimizer` and `train` (defaults below, the same for every architecture
so that runs of different models have the same budget). An optional fifth section, `mesh`, sets
the device mesh and the parameter sharding (see `training/sharding.py`).
"""

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from training.sharding import default_mesh_config, mesh_shape

SECTIONS = ("model", "data", "optimizer", "train")
# Sections that a config may leave out (configs saved before the section existed).
OPTIONAL_SECTIONS = ("mesh",)


def default_training_config() -> ml_collections.ConfigDict:
    """Return the `data`, `optimizer` and `train` sections with their CPU-sized defaults.

    The defaults train the default models of `configs/` in a few minutes on 2 idle CPU cores
    (Mamba about 2, the Transformer about 1).
    """
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    # Text corpus: a file or folder of text files; "" means the Python standard library's source.
    config.data.path = ""
    # Glob (relative to `path`) of the files read when `path` is a folder.
    config.data.pattern = "**/*.py"
    # Fraction of the corpus bytes held out for validation (0 < fraction < 1).
    config.data.val_fraction = 0.01
    # Folder for the tokenized corpus cache; "" means the data package's default location.
    config.data.cache_dir = ""
    # Context length in byte tokens; each training row contains seq_len + 1 tokens.
    config.data.seq_len = 128
    # Sequences per optimizer step, over all processes and devices.
    config.data.batch_size = 16

    config.optimizer = ml_collections.ConfigDict()
    # Peak learning rate (per optimizer step), reached after the warmup.
    config.optimizer.learning_rate = 3e-3
    # Optimizer steps of linear warmup from 0 to the peak learning rate.
    config.optimizer.warmup_steps = 50
    # Learning rate at the end of the cosine decay, as a fraction of the peak (0 to 1).
    config.optimizer.final_learning_rate_fraction = 0.1
    # Optimizer step from which the learning rate is late_phase_learning_rate, constant: the warmup
    # and cosine decay then end at this step. 0 means no late phase, and a run whose
    # train.num_steps is smaller never reaches it.
    config.optimizer.late_phase_step = 0
    # Learning rate of the late phase; 0 when late_phase_step is 0.
    config.optimizer.late_phase_learning_rate = 0.0
    # AdamW decay rates of the first and second moment estimates (dimensionless).
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    # Decoupled weight decay (per step, multiplied by the learning rate) on matrices only.
    config.optimizer.weight_decay = 0.1
    # Maximum global L2 norm of the gradient; larger gradients are scaled down to it.
    config.optimizer.grad_clip_norm = 1.0
    # Micro-batches per optimizer step (gradient accumulation); must divide data.batch_size.
    config.optimizer.accumulation_steps = 1
    # Regular expression over parameter paths ("blocks/0/mixer/in_proj/kernel"); the parameters
    # it matches keep their initial values. "" trains every parameter.
    config.optimizer.frozen_parameters = ""

    config.train = ml_collections.ConfigDict()
    # Optimizer steps in the whole run (the cosine decay ends here).
    config.train.num_steps = 400
    # Seed of parameter initialisation and of the training batch order.
    config.train.seed = 0
    # Optimizer steps between progress lines (the first steps are logged individually).
    config.train.log_every = 25
    # Optimizer steps logged individually at the start of a run.
    config.train.log_first_steps = 5
    # Optimizer steps between validation passes (one more runs at the end).
    config.train.eval_every = 100
    # Validation batches of data.batch_size sequences each, fixed for the whole run.
    config.train.eval_batches = 8
    # Optimizer steps between checkpoints (one more is written at the end and on SIGTERM).
    config.train.checkpoint_every = 100
    # Checkpoints kept in the workdir; older ones are deleted.
    config.train.keep_checkpoints = 3

    # Device mesh and parameter sharding rules (fields in training/sharding.py).
    config.mesh = default_mesh_config()
    return config


# Data, optimizer and train overrides of the text-pretraining variants, shared by
# configs/mamba_lm.py and configs/transformer_lm.py so that both architectures get the same budget.
TRAINING_VARIANTS = {
    "": {},
    "tiny": {
        "data.seq_len": 32, "data.batch_size": 8,
        "optimizer.warmup_steps": 5,
        "train.num_steps": 20, "train.log_every": 5, "train.eval_every": 10,
        "train.eval_batches": 2, "train.checkpoint_every": 10,
    },
    "small": {
        "data.seq_len": 1024, "data.batch_size": 64,
        "optimizer.learning_rate": 1.5e-3, "optimizer.warmup_steps": 1000,
        "train.num_steps": 20000, "train.log_every": 100, "train.eval_every": 1000,
        "train.eval_batches": 16, "train.checkpoint_every": 2000,
    },
    "medium": {
        "data.seq_len": 2048, "data.batch_size": 64,
        "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 2000,
        "train.num_steps": 50000, "train.log_every": 100, "train.eval_every": 2000,
        "train.eval_batches": 16, "train.checkpoint_every": 2000,
    },
}


def with_training_variants(model_variants: Mapping[str, Mapping[str, Any]]
                           ) -> dict[str, dict[str, Any]]:
    """Return `TRAINING_VARIANTS` with each variant's model overrides from `model_variants` added."""
    return {name: {**overrides, **model_variants.get(name, {})}
            for name, overrides in TRAINING_VARIANTS.items()}


def apply_variant(config: ml_collections.ConfigDict, variant: str,
                  variants: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
    """Apply the dotted-path overrides of `variant` ("" is the default) to `config`, then lock it.

    Locking makes a later override of an unknown field (`--config.train.nmu_steps=5`) an error.
    """
    if variant not in variants:
        allowed = ", ".join(repr(name) for name in variants)
        raise ValueError(f"unknown config variant {variant!r}; allowed variants: {allowed}")
    for dotted, value in variants[variant].items():
        set_field(config, dotted, value)
    config.lock()
    return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set an existing field named by a dotted path; raise ValueError for an unknown one."""
    check_field_paths(config, [dotted])
    *parents, name = dotted.split(".")
    section = config
    for part in parents:
        section = section[part]
    section[name] = value


def _require(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field {field}={value!r}; allowed: {allowed}")


def _validate_model(model_config: ml_collections.ConfigDict) -> None:
    """Raise the model config's own ValueError, with the field named as `model.FIELD`."""
    from models.registry import model_dataclass  # noqa: PLC0415 (imports the architecture)

    try:
        model_dataclass(model_config)
    except ValueError as error:
        message = str(error)
        first_word = message.split(" ", 1)[0]
        if first_word in model_config:
            message = f"model.{message}"
        raise ValueError(message) from None


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
    """Raise ValueError naming the field, its value and the allowed values for a bad setting.

    `num_devices` is the number of devices (over all processes) that each micro-batch is split
    over.
    """
    for section in SECTIONS:
        if section not in config:
            raise ValueError(f"config has no section {section!r}; a config needs the sections "
                             f"{', '.join(SECTIONS)}")
    unknown = sorted(set(config.keys()) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    mesh_shape(config, num_devices)  # Raises ValueError for a mesh that does not fit.
    _validate_model(config.model)

    data, optimizer, train = config.data, config.optimizer, config.train
    _require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "0 < x < 1")
    _require(data.seq_len > 0, "data.seq_len", data.seq_len, "an integer > 0")
    _require(data.batch_size > 0, "data.batch_size", data.batch_size, "an integer > 0")

    _require(math.isfinite(optimizer.learning_rate) and optimizer.learning_rate > 0,
             "optimizer.learning_rate", optimizer.learning_rate, "a finite number > 0")
    _require(optimizer.warmup_steps >= 0, "optimizer.warmup_steps", optimizer.warmup_steps,
             "an integer >= 0")
    _require(0 <= optimizer.final_learning_rate_fraction <= 1,
             "optimizer.final_learning_rate_fraction", optimizer.final_learning_rate_fraction,
             "0 <= x <= 1")
    late_step, late_rate = optimizer.late_phase_step, optimizer.late_phase_learning_rate
    _require(late_step == 0 or late_step >= max(optimizer.warmup_steps, 1),
             "optimizer.late_phase_step", late_step,
             f"0 (no late phase) or an integer >= optimizer.warmup_steps "
             f"({optimizer.warmup_steps}), so that the warmup ends first")
    if late_step > 0:
        _require(math.isfinite(late_rate) and late_rate > 0, "optimizer.late_phase_learning_rate",
                 late_rate, "a finite number > 0 when optimizer.late_phase_step > 0")
    else:
        _require(late_rate == 0, "optimizer.late_phase_learning_rate", late_rate,
                 "0 while optimizer.late_phase_step is 0; set both to use a late phase")
    _require(0 <= optimizer.b1 < 1, "optimizer.b1", optimizer.b1, "0 <= x < 1")
    _require(0 <= optimizer.b2 < 1, "optimizer.b2", optimizer.b2, "0 <= x < 1")
    _require(optimizer.weight_decay >= 0, "optimizer.weight_decay", optimizer.weight_decay,
             "a number >= 0")
    _require(optimizer.grad_clip_norm > 0, "optimizer.grad_clip_norm", optimizer.grad_clip_norm,
             "a number > 0")
    accumulation = optimizer.accumulation_steps
    _require(accumulation >= 1, "optimizer.accumulation_steps", accumulation, "an integer >= 1")

    divisor = accumulation * num_devices
    _require(data.batch_size % divisor == 0, "data.batch_size", data.batch_size,
             f"a multiple of optimizer.accumulation_steps ({accumulation}) times the number of "
             f"devices ({num_devices}), so that every micro-batch splits evenly over the devices")
    _require(data.batch_size % num_processes == 0, "data.batch_size", data.batch_size,
             f"a multiple of the number of processes ({num_processes})")

    _require(train.num_steps >= 1, "train.num_steps", train.num_steps, "an integer >= 1")
    _require(train.seed >= 0, "train.seed", train.seed, "an integer >= 0")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                 "eval_batches"):
        value = train[name]
        _require(value >= 1, f"train.{name}", value, "an integer >= 1")
    _require(train.log_first_steps >= 0, "train.log_first_steps", train.log_first_steps,
             "an integer >= 0")


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the model section as a plain dict (for saving and comparing)."""
    model = config["model"]
    if isinstance(model, ml_collections.ConfigDict):
        return model.to_dict()
    if dataclasses.is_dataclass(model):
        return dataclasses.asdict(model)
    return dict(model)


def differing_model_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Return 'name: saved -> current' for every model field that differs between two configs."""
    names = sorted(set(saved) | set(current))
    missing = "<absent>"
    return [f"{name}: {saved.get(name, missing)!r} -> {current.get(name, missing)!r}"
            for name in names if saved.get(name, missing) != current.get(name, missing)]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Return `get_config(variant)` of a config file given as "path/to/file.py[:variant]"."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found; pass --config=configs/NAME.py[:VARIANT]")
    if not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a Python file; pass "
                         "--config=configs/NAME.py[:VARIANT]")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(variant) function")
    return module.get_config(variant)


def check_field_paths(config: ml_collections.ConfigDict, dotted_paths: list[str]) -> None:
    """Raise ValueError naming the first dotted path that is not a field of `config`."""
    for dotted in dotted_paths:
        *parents, name = dotted.split(".")
        section = config
        for depth, part in enumerate(parents):
            if not isinstance(section, ml_collections.ConfigDict) or part not in section:
                where = ".".join(parents[:depth]) or "the config"
                raise ValueError(f"unknown config section {'.'.join(parents[:depth + 1])!r}; "
                                 f"allowed sections of {where}: {', '.join(sorted(section))}")
            section = section[part]
        if not isinstance(section, ml_collections.ConfigDict) or name not in section:
            raise ValueError(f"unknown config field {dotted!r}; allowed fields of "
                             f"{'.'.join(parents) or 'the config'}: "
                             f"{', '.join(sorted(section))}")
