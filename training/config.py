"""Training fields shared by every config file, variant overrides, and config validation.

A config has four sections: `model` (architecture and model dataclass fields, written by each file
in `configs/`), `data`, `optimizer` and `train` (defaults below, the same for every architecture
so that runs of different models have the same budget). An optional fifth section, `mesh`, sets
the device mesh and the parameter sharding (see `training/sharding.py`).
"""

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import traceback
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from training.sharding import check_mesh_rules, default_mesh_config, mesh_shape

SECTIONS = ("model", "data", "optimizer", "train")
# Sections that a config may leave out (configs saved before the section existed).
OPTIONAL_SECTIONS = ("mesh",)
# Fields of `default_training_config` that a config may leave out (configs saved before the
# field existed); the code that reads them has a default.
OPTIONAL_FIELDS = ("optimizer.frozen_parameters", "mesh.logical_rules")
# Fields that `training.tasks.synthetic_task_config` adds, with their types.
TASK_FIELD_TYPES = {"data.task": (str,), "data.task_options": (ml_collections.ConfigDict,),
                    "train.probes": (str,)}


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
    """Return `TRAINING_VARIANTS` merged with a config file's own variants.

    A variant's own overrides (usually `model.*` fields) win over the training overrides of the
    same name, and a variant that `TRAINING_VARIANTS` lacks gets no training overrides.
    """
    names = list(TRAINING_VARIANTS) + [name for name in model_variants
                                       if name not in TRAINING_VARIANTS]
    return {name: {**TRAINING_VARIANTS.get(name, {}), **model_variants.get(name, {})}
            for name in names}


def apply_variant(config: ml_collections.ConfigDict, variant: str,
                  variants: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
    """Apply the dotted-path overrides of `variant` ("" is the default) to `config`, then lock it.

    Locking makes a later override of an unknown field (`--config.train.nmu_steps=5`) an error.
    """
    allowed = ", ".join(repr(name) for name in variants)
    if "," in variant:
        raise ValueError(f"config variant {variant!r} joins several variants, but this config "
                         f"takes one; allowed variants: {allowed}")
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; allowed variants: {allowed}")
    for dotted, value in variants[variant].items():
        set_field(config, dotted, value, source=f"config variant {variant!r}")
    config.lock()
    return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any, *,
              source: str = "the override") -> None:
    """Set an existing field named by a dotted path.

    Raises ValueError for an unknown field, and for a value whose type the field's current value
    rejects (ml_collections keeps each field's type). `source` names the setter in that message.
    """
    check_field_paths(config, [dotted])
    *parents, name = dotted.split(".")
    section = config
    for part in parents:
        section = section[part]
    try:
        section[name] = value
    except TypeError:
        current = section[name]
        expected = expected_type(config, dotted)
        raise ValueError(
            f"invalid config field {dotted}={current!r} ({type(current).__name__}): {source} "
            f"sets it to {value!r} ({type(value).__name__}); expected "
            f"{_types_description(expected) if expected else 'one type for both'}") from None


def _require(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field {field}={value!r}; allowed: {allowed}")


# ---- field types

# A field's type -> its name in messages.
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              type(None): "None", ml_collections.ConfigDict: "a config section"}


def _types_description(kinds: tuple[type, ...]) -> str:
    return " or ".join(TYPE_NAMES.get(kind, f"a {kind.__name__}") for kind in kinds)


def _has_type(value: Any, kinds: tuple[type, ...]) -> bool:
    """Return whether `value` is one of `kinds`; a bool is no number, and an integer is a float."""
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, numbers.Real):
        return True
    if int in kinds and isinstance(value, numbers.Integral):
        return True
    return any(kind not in (bool, int, float) and isinstance(value, kind) for kind in kinds)


@functools.cache
def _model_field_types(architecture: str) -> dict[str, tuple[type, ...]]:
    """Return the type of each field of the architecture's config dataclass ({} for an unknown
    architecture). Fields typed `Any`, such as the dtypes, are left out."""
    from models.registry import ARCHITECTURES  # noqa: PLC0415 (imports JAX)

    if architecture not in ARCHITECTURES:
        return {}
    module_name, class_name = ARCHITECTURES[architecture]
    config_class = getattr(importlib.import_module(module_name), class_name)
    field_types = {}
    for name, hint in typing.get_type_hints(config_class).items():
        is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        kinds = typing.get_args(hint) if is_union else (hint,)
        if all(isinstance(kind, type) and kind is not Any for kind in kinds):
            field_types[name] = kinds
    return field_types


def expected_type(config: ml_collections.ConfigDict, dotted: str) -> tuple[type, ...] | None:
    """Return the types allowed for the field `dotted` ("data.seq_len"), or None if unknown.

    A training field takes the type of its default in `default_training_config`, except the
    tuples of mesh rules, which `check_mesh_rules` checks. A model field takes the type of the
    architecture's config dataclass field.
    """
    if dotted in TASK_FIELD_TYPES:
        return TASK_FIELD_TYPES[dotted]
    section, _, name = dotted.partition(".")
    if section == "model":
        architecture = config["model"].get("architecture")
        if not isinstance(architecture, str):
            return None
        return _model_field_types(architecture).get(name)
    defaults = default_training_config()
    if section not in defaults or name not in defaults[section]:
        return None
    default = defaults[section][name]
    return None if isinstance(default, tuple) else (type(default),)


def check_config_fields(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first missing section or field, or a field of the wrong type.

    Checks the sections, the fields of `default_training_config` (except `OPTIONAL_FIELDS`), the
    fields that the synthetic tasks add, the form of the mesh rules, and the model fields that
    the architecture's config dataclass types. `validate_config` checks the values.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"the config is a {type(config).__name__}; expected an "
                         f"ml_collections.ConfigDict with the sections {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if section not in config:
            raise ValueError(f"config has no section {section!r}; a config needs the sections "
                             f"{', '.join(SECTIONS)}")
    unknown = sorted(set(config.keys()) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    for section in config.keys():
        if not isinstance(config[section], ml_collections.ConfigDict):
            raise ValueError(f"invalid config section {section}={config[section]!r}; allowed: "
                             "an ml_collections.ConfigDict of fields")

    for section, defaults in default_training_config().items():
        if section not in config:
            continue  # Only `mesh` may be absent, checked above.
        for name, default in defaults.items():
            dotted = f"{section}.{name}"
            if name not in config[section] and dotted not in OPTIONAL_FIELDS:
                raise ValueError(f"missing config field {dotted}; get_config must keep every "
                                 "field of training.config.default_training_config, and this "
                                 f"one defaults to {default!r}")
        # A misspelt field in a config file would otherwise be ignored without notice.
        allowed = sorted(set(defaults) | {dotted.split(".")[1] for dotted in TASK_FIELD_TYPES
                                          if dotted.startswith(section + ".")})
        unknown = [f"{section}.{name}" for name in sorted(set(config[section]) - set(allowed))]
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; allowed fields of "
                             f"{section}: {', '.join(allowed)}")

    for section in config.keys():
        for name, value in config[section].items():
            dotted = f"{section}.{name}"
            kinds = expected_type(config, dotted)
            if kinds is not None and not _has_type(value, kinds):
                raise ValueError(f"invalid config field {dotted}={value!r}; allowed: "
                                 f"{_types_description(kinds)}")
    if "mesh" in config:
        check_mesh_rules(config.mesh)


def _validate_model(model_config: ml_collections.ConfigDict):
    """Return the model's config dataclass, or raise its ValueError with the field named as
    `model.FIELD`."""
    from models.registry import model_dataclass  # noqa: PLC0415 (imports the architecture)

    try:
        return model_dataclass(model_config)
    except ValueError as error:
        message = str(error)
        first_word = message.split(" ", 1)[0]
        if first_word in model_config:
            message = f"model.{message}"
        raise ValueError(message) from None


def _check_corpus_path(data: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a `data.path` that does not exist, naming the folder and pattern that
    a path with glob characters stands for."""
    path = data.path
    if data.get("task") or not path or Path(path).expanduser().exists():
        return
    parts = Path(path).parts
    first_glob = next((index for index, part in enumerate(parts)
                       if any(character in part for character in "*?[")), None)
    if first_glob is not None:
        folder = str(Path(*parts[:first_glob])) if first_glob else "."
        pattern = "/".join(parts[first_glob:])
        raise ValueError(f"invalid config field data.path={path!r}: the path does not exist, and "
                         "data.path takes no glob; allowed: the folder in data.path and the glob "
                         f"in data.pattern, here data.path={folder!r} and "
                         f"data.pattern={pattern!r}")
    raise ValueError(f"invalid config field data.path={path!r}: the path does not exist; "
                     "allowed: an existing folder, UTF-8 text file or .bin token file, or '' for "
                     "the Python standard library")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
    """Raise ValueError naming the field, its value and the allowed values for a bad setting.

    `num_devices` is the number of devices (over all processes) that each micro-batch is split
    over.
    """
    check_config_fields(config)
    mesh_shape(config, num_devices)  # Raises ValueError for a mesh that does not fit.
    model = _validate_model(config.model)

    data, optimizer, train = config.data, config.optimizer, config.train
    _require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "0 < x < 1")
    _require(data.seq_len > 0, "data.seq_len", data.seq_len, "an integer > 0")
    if getattr(model, "positions", None) == "sinusoidal":
        _require(data.seq_len <= model.max_len, "data.seq_len", data.seq_len,
                 f"at most model.max_len ({model.max_len}), the longest sequence that sinusoidal "
                 "positions encode; raise model.max_len")
    _check_corpus_path(data)
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


# ---- config files

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
# The TypeError of ml_collections for an assignment that changes a field's type.
_FIELD_TYPE_ERROR = re.compile(
    r"Could not override field '(?P<field>[^']*)' \(reference\)\. (?P<value>.*) is of original "
    r"type <class '(?P<value_type>[^']*)'> and cannot be casted to type <class '(?P<type>[^']*)'>")
_BUILTIN_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Return the config of a config file given as "path/to/file.py[:variant]".

    As with ml_collections' config flag, a spec with ":" calls `get_config(variant)` and one
    without calls `get_config()`. Each failure raises one ValueError that names the file. A syntax
    error comes with its line and column, and an exception while importing the file or in
    get_config with the line of the file. A get_config that cannot take the arguments and a
    result that is not a ConfigDict are reported too. ValueErrors of this repository's config
    helpers (an unknown variant) keep their own message.
    """
    path, colon, variant = spec.partition(":")
    if not os.path.isfile(path) and any(os.path.isfile(candidate)
                                        for candidate in (spec, spec.rpartition(":")[0])):
        raise ValueError(f"config file {path!r} not found: the first ':' in {spec!r} starts the "
                         "variant, so the file's path cannot contain ':'; move or link the file "
                         "to a path without ':'")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found; pass --config=configs/NAME.py[:VARIANT]")
    if not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a Python file; pass "
                         "--config=configs/NAME.py[:VARIANT]")
    module = _import_config_file(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {path!r} has no get_config(variant) function")
    arguments = (variant,) if colon else ()
    _check_get_config_arguments(path, get_config, arguments)
    try:
        config = get_config(*arguments)
    except Exception as error:  # noqa: BLE001 (any error of the file becomes one message)
        call = f"get_config({variant!r})" if colon else "get_config()"
        raise _config_file_error(path, error, f"in {call}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        hint = {dict: " (return the ConfigDict itself, not config.to_dict())",
                type(None): " (is the return statement missing?)"}.get(type(config), "")
        raise ValueError(f"config file {path!r}: get_config returned a {type(config).__name__}; "
                         f"expected an ml_collections.ConfigDict{hint}")
    return config


def _import_config_file(path: str):
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        if not _is_same_file(error.filename, path):
            raise _config_file_error(path, error, "while it was imported") from None
        code = f" ({error.text.strip()})" if error.text and error.text.strip() else ""
        raise ValueError(f"config file {path!r} has a syntax error at line {error.lineno}, "
                         f"column {error.offset}{code}: {error.msg}") from None
    except Exception as error:  # noqa: BLE001 (any error of the file becomes one message)
        raise _config_file_error(path, error, "while it was imported") from None
    return module


def _check_get_config_arguments(path: str, get_config, arguments: tuple[str, ...]) -> None:
    """Raise ValueError if get_config cannot be called with `arguments`, naming its line."""
    try:
        signature = inspect.signature(get_config)
    except ValueError:
        return  # No signature to check (a builtin); the call itself reports a mismatch.
    try:
        signature.bind(*arguments)
    except TypeError:
        code = getattr(get_config, "__code__", None)
        where = f" at line {code.co_firstlineno}" if code else ""
        if not arguments:
            raise ValueError(
                f"config file {path!r}: get_config{where} requires an argument; pass "
                f"--config={path}:VARIANT, or give it a default (variant: str = \"\")") from None
        takes = "takes no argument" if not signature.parameters else "has another signature"
        raise ValueError(
            f"config file {path!r}: get_config{where} {takes}, so it cannot take the variant "
            f"{arguments[0]!r}; define get_config(variant: str = \"\"), or drop "
            f"':{arguments[0]}' from --config") from None


def _config_file_error(path: str, error: Exception, when: str) -> ValueError:
    """Return one ValueError for an exception of a config file: the file, the exception and the
    last line of the file in its traceback.

    A ValueError raised in this repository's own code, outside the file (an unknown variant in
    `apply_variant`), already names the field, so its message is kept as it is.
    """
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, ValueError) and frames:
        innermost = Path(frames[-1].filename)
        in_repository = (innermost.is_file()
                         and innermost.resolve().is_relative_to(REPOSITORY_ROOT)
                         and "site-packages" not in innermost.parts)
        if in_repository and not _is_same_file(frames[-1].filename, path):
            return ValueError(str(error))

    file_frames = [frame for frame in frames if _is_same_file(frame.filename, path)]
    where = ""
    if file_frames:
        line = file_frames[-1]
        where = f" at line {line.lineno}" + (f" ({line.line})" if line.line else "")
    return ValueError(f"config file {path!r} raised {type(error).__name__} {when}{where}: "
                      f"{_exception_text(error)}")


def _exception_text(error: Exception) -> str:
    """Return the message of `error`, rewording the type errors of ml_collections."""
    match = _FIELD_TYPE_ERROR.fullmatch(str(error))
    if not match:
        return str(error)
    field_type = _BUILTIN_TYPES.get(match["type"])
    expected = _types_description((field_type,)) if field_type else f"a {match['type']}"
    return (f"field {match['field']!r} takes {expected}, got {match['value']} "
            f"({match['value_type']})")


def _is_same_file(first: str | None, second: str) -> bool:
    return first is not None and os.path.realpath(first) == os.path.realpath(second)


def check_field_paths(config: ml_collections.ConfigDict, dotted_paths: list[str]) -> None:
    """Raise ValueError naming the first dotted path that is not a field of `config`."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"the config is a {type(config).__name__}; expected an "
                         "ml_collections.ConfigDict")
    for dotted in dotted_paths:
        *parents, name = dotted.split(".")
        section = config
        for depth, part in enumerate(parents):
            where = ".".join(parents[:depth]) or "the config"
            if part not in section:
                subsections = [key for key in sorted(section)
                               if isinstance(section[key], ml_collections.ConfigDict)]
                if subsections:
                    allowed = f"allowed sections of {where}: {', '.join(subsections)}"
                else:
                    fields = ", ".join(sorted(section))
                    allowed = f"{where} has no sections, only the fields {fields}"
                raise ValueError(f"unknown config section {'.'.join(parents[:depth + 1])!r}; "
                                 f"{allowed}")
            section = section[part]
            if not isinstance(section, ml_collections.ConfigDict):
                field = ".".join(parents[:depth + 1])
                raise ValueError(f"config field {field!r} is a value, not a section, so "
                                 f"{dotted!r} is not a field; set the value with "
                                 f"--config.{field}=VALUE")
        if name not in section:
            raise ValueError(f"unknown config field {dotted!r}; allowed fields of "
                             f"{'.'.join(parents) or 'the config'}: "
                             f"{', '.join(sorted(section))}")
