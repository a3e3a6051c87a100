"""Data sources of the training loop: the text corpus, or a synthetic task named by `data.task`.

A config whose `data` section has a non-empty `task` trains on batches from
`data.synthetic.SYNTHETIC_TASKS[task]`, called with `data.task_options` as keyword arguments and
`data.seq_len`, `data.batch_size` for the sizes. A task batch is a dict of (b, t) arrays
`inputs`, `targets` and `loss_mask`. The loss is the cross entropy averaged over the positions
where `loss_mask` is True, and evaluation also reports the accuracy there (argmax of the logits
equals the target).

Both sources offer the same methods to the loop in `training.loop`:

  describe()                                   one line for the log
  loss_fn(params, state, batch) -> (loss_sum, count)       for `train_step`
  eval_fn(state, batch) -> dict of sums                     for `eval_step`-like evaluation
  train_batch(seed, step, process_index, batch_size)        this process's rows
  validation_batches(num_batches)                           fixed for the whole run
  summarize(sums) -> dict of metrics                        loss, and bits/byte or accuracy
  probes(state, step, workdir, is_writer) -> dict           probe metrics (see `train.probes`)
"""

import importlib
import inspect
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import data
from data.synthetic import SYNTHETIC_TASKS
from training.config import check_field_paths, default_training_config, set_field
from training.steps import bits_per_byte, eval_step, sequence_loss

# `process_index` of the validation stream: no real process has it, so validation batches never
# repeat a training batch of the same seed.
VALIDATION_STREAM = 1 << 20
# Keyword arguments that the loop passes to every generator itself.
LOOP_ARGUMENTS = ("seed", "step", "process_index", "batch_size", "seq_len")
# `train.probes` value -> module with `probe_metrics(model, source, step, workdir, is_writer)`.
PROBE_MODULES = {"attention": "experiments.birth"}
TASK_BATCH_KEYS = ("inputs", "targets", "loss_mask")


def task_name(config: ml_collections.ConfigDict) -> str:
    """Return `data.task`, or "" for the text corpus (also when the config has no such field)."""
    return config.data.get("task", "") or ""


def task_vocab_size(task: str, options: dict[str, Any]) -> int:
    """Return the number of token ids that the task's generator emits with `options`."""
    generator = SYNTHETIC_TASKS[task]
    default = inspect.signature(generator).parameters["vocab_size"].default
    return int(options.get("vocab_size", default))


def validate_task_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field for an unknown task, option, or a too small vocabulary."""
    task = task_name(config)
    if task not in SYNTHETIC_TASKS:
        allowed = ", ".join(repr(name) for name in SYNTHETIC_TASKS)
        raise ValueError(f"invalid config field data.task={task!r}; allowed: {allowed}, or '' for "
                         "the text corpus")
    if config.data.get("path"):
        raise ValueError(f"invalid config field data.path={config.data.path!r}: the synthetic "
                         f"task {task!r} generates its sequences and reads no corpus; allowed: "
                         "'' (or data.task='' to train on the corpus)")
    options = dict(config.data.get("task_options", {}))
    parameters = inspect.signature(SYNTHETIC_TASKS[task]).parameters
    allowed_options = [name for name in parameters if name not in LOOP_ARGUMENTS]
    for name in options:
        if name not in allowed_options:
            raise ValueError(f"unknown config field data.task_options.{name} for task {task!r}; "
                             f"allowed: {', '.join(allowed_options)}")
    # A one-sequence batch checks the option values with the generator's own rules, before any
    # model or workdir file is made.
    try:
        SYNTHETIC_TASKS[task](seed=0, step=0, batch_size=1, seq_len=config.data.seq_len, **options)
    except (TypeError, ValueError) as error:
        message = str(error)
        fields = [f"data.task_options.{name}" for name in options if message.startswith(name)]
        if message.startswith("seq_len"):
            fields = ["data.seq_len"]
        field = fields[0] if fields else "data.task_options"
        raise ValueError(f"invalid config field {field} for task {task!r}: {message}") from None
    vocab_size = task_vocab_size(task, options)
    if config.model.vocab_size < vocab_size:
        raise ValueError(f"invalid config field model.vocab_size={config.model.vocab_size}; "
                         f"allowed: an integer >= {vocab_size}, the vocabulary of task {task!r}")
    probes = config.train.get("probes", "")
    if probes and probes not in PROBE_MODULES:
        raise ValueError(f"invalid config field train.probes={probes!r}; allowed: '' or "
                         f"{', '.join(repr(name) for name in PROBE_MODULES)}")


def masked_loss(params: Any, state, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Return the summed cross entropy in nats over `loss_mask` positions, and their count.

    Targets outside the mask do not enter the sum, whatever their values.
    """
    model = nnx.merge(state.graphdef, params, state.rest)
    logits_btv = model(batch["inputs"])
    losses_bt = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv.astype(jnp.float32), batch["targets"])
    mask_bt = batch["loss_mask"]
    return jnp.sum(jnp.where(mask_bt, losses_bt, 0.0)), jnp.sum(mask_bt, dtype=jnp.float32)


def masked_eval_step(state, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Return the summed loss, the number of scored positions and how many of them are correct."""
    model = state.model()
    logits_btv = model(batch["inputs"]).astype(jnp.float32)
    losses_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    mask_bt = batch["loss_mask"]
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == batch["targets"]) & mask_bt
    return {"loss_sum": jnp.sum(jnp.where(mask_bt, losses_bt, 0.0)),
            "token_count": jnp.sum(mask_bt, dtype=jnp.float32),
            "correct_count": jnp.sum(correct_bt, dtype=jnp.float32)}


class TextData:
    """Byte windows of a text corpus: the default data of `train.py`."""

    # Whether a token is a byte, so that bits per token are bits per byte.
    tokens_are_bytes = True
    loss_fn = staticmethod(sequence_loss)
    eval_fn = staticmethod(eval_step)

    def __init__(self, corpus: data.Corpus, config: ml_collections.ConfigDict):
        if config.model.vocab_size < data.VOCAB_SIZE:
            raise ValueError(
                f"invalid config field model.vocab_size={config.model.vocab_size}; allowed: an "
                f"integer >= {data.VOCAB_SIZE} (byte ids 0..255 and the document separator)")
        self.corpus = corpus
        self.config = config

    def describe(self) -> str:
        corpus = self.corpus
        return (f"corpus {corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
                f"validation tokens, unigram entropy "
                f"{data.unigram_entropy_bits(corpus.val):.3f} bits/byte")

    def train_batch(self, seed: int, step: int, process_index: int, batch_size: int
                    ) -> np.ndarray:
        return data.train_batch(self.corpus.train, seed=seed, step=step,
                                process_index=process_index, batch_size=batch_size,
                                seq_len=self.config.data.seq_len)

    def validation_batches(self, num_batches: int) -> list[np.ndarray]:
        return data.validation_batches(self.corpus.val, seq_len=self.config.data.seq_len,
                                       batch_size=self.config.data.batch_size,
                                       num_batches=num_batches)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / sums["token_count"]
        return {"loss": loss, "bits_per_byte": bits_per_byte(loss)}

    def probes(self, state, step: int, workdir: str | os.PathLike, is_writer: bool) -> dict:
        del state, step, workdir, is_writer
        return {}


class TaskData:
    """Batches of the synthetic task `data.task`, a pure function of (seed, step, process)."""

    tokens_are_bytes = False
    loss_fn = staticmethod(masked_loss)
    eval_fn = staticmethod(masked_eval_step)

    def __init__(self, config: ml_collections.ConfigDict):
        validate_task_config(config)
        self.config = config
        self.task = task_name(config)
        self.options = dict(config.data.get("task_options", {}))
        self.generator = SYNTHETIC_TASKS[self.task]

    def describe(self) -> str:
        options = ", ".join(f"{name}={value}" for name, value in sorted(self.options.items()))
        return (f"synthetic task {self.task} ({options or 'default options'}), sequences of "
                f"{self.config.data.seq_len} tokens")

    def generate(self, seed: int, step: int, process_index: int, batch_size: int,
                 seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Return the generator's full batch (with any extra masks of the task)."""
        return self.generator(seed=seed, step=step, process_index=process_index,
                              batch_size=batch_size,
                              seq_len=self.config.data.seq_len if seq_len is None else seq_len,
                              **self.options)

    def train_batch(self, seed: int, step: int, process_index: int, batch_size: int
                    ) -> dict[str, np.ndarray]:
        batch = self.generate(seed, step, process_index, batch_size)
        return {key: batch[key] for key in TASK_BATCH_KEYS}

    def validation_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        seed, batch_size = self.config.train.seed, self.config.data.batch_size
        return [self.train_batch(seed, index, VALIDATION_STREAM, batch_size)
                for index in range(num_batches)]

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / sums["token_count"],
                "accuracy": sums["correct_count"] / sums["token_count"]}

    def probes(self, state, step: int, workdir: str | os.PathLike, is_writer: bool) -> dict:
        """Run the probes that `train.probes` names on the current model; {} when none."""
        name = self.config.train.get("probes", "")
        if not name:
            return {}
        module = importlib.import_module(PROBE_MODULES[name])
        return module.probe_metrics(state.model(), self, step, workdir, is_writer)


def masked_accuracy(model: nnx.Module, batch: dict[str, np.ndarray]) -> float:
    """Return the fraction of `loss_mask` positions where the model's argmax equals the target."""
    logits_btv = model(jnp.asarray(batch["inputs"]))
    correct_bt = np.asarray(jnp.argmax(logits_btv, axis=-1)) == batch["targets"]
    return float(correct_bt[batch["loss_mask"]].mean())


# ---- config files of the synthetic-task experiments

ARCHITECTURES = ("mamba", "transformer")


def model_section(architecture: str, vocab_size: int) -> ml_collections.ConfigDict:
    """Return the model section shared by the task configs: 2 layers of width 64."""
    model = ml_collections.ConfigDict()
    model.architecture = architecture
    # Token ids of the task; the embedding table is padded up to a multiple of 8 rows.
    model.vocab_size = vocab_size
    model.pad_vocab_size_multiple = 8
    # Width of the residual stream, in channels.
    model.d_model = 64
    # Residual blocks.
    model.num_layers = 2
    # The output head reuses the embedding table.
    model.tie_embeddings = True
    # Compute and parameter storage dtypes.
    model.dtype = "float32"
    model.param_dtype = "float32"
    if architecture == "mamba":
        # SSM state size N per channel, and the expansion factor of the mixer's width.
        model.d_state = 16
        model.expand = 2
        # Selective scan: "associative", "sequential" or "chunked" (time steps per chunk).
        # Sequential is the fastest of the three on CPU for these sizes: 0.27 s per training step
        # of 8 x 256 tokens against 0.83 s (associative) on 2 shared cores.
        model.scan = "sequential"
        model.chunk_size = 256
        # False makes dt, B and C independent of the input (the S4D-like, time-invariant contrast).
        model.selective = True
    else:
        # Query heads, and channels per head (None: d_model // num_heads).
        model.num_heads = 2
        model.head_dim = ml_collections.config_dict.placeholder(int)
        # Feed-forward width in channels (None: 8/3 * d_model rounded up to a multiple of 8).
        model.ffn_dim = ml_collections.config_dict.placeholder(int)
        # True drops the feed-forward sublayers (an attention-only Transformer).
        model.attention_only = False
        # Position encoding: "rope", "sinusoidal" or "none".
        model.positions = "rope"
    return model


def synthetic_task_config(task: str, task_options: dict[str, Any], variant: str,
                          variants: dict[str, dict[str, Any]], *,
                          default_architecture: str = "mamba") -> ml_collections.ConfigDict:
    """Build, override and lock the config of a synthetic task experiment.

    A key "mamba" or "transformer" inside a variant's overrides holds overrides that apply to
    that architecture only. `variant` is "" or comma-separated names of `variants`, applied in
    order after the overrides of `variants[""]` (the CPU default), for example
    "transformer,tiny". The names "mamba" and "transformer" choose the architecture
    (`default_architecture` when neither is given) before any override. Two named variants that
    set one field to different values raise ValueError, whatever their order.
    """
    names = [""] + [name for name in variant.split(",") if name]
    for name in names:
        if name not in variants:
            allowed = ", ".join(repr(key) for key in variants)
            raise ValueError(f"unknown config variant {name!r}; allowed variants: {allowed}, "
                             "joined by commas")
    architectures = [name for name in names if name in ARCHITECTURES]
    if len(set(architectures)) > 1:
        raise ValueError(f"config variant {variant!r} names both architectures "
                         f"({', '.join(architectures)}); allowed: one of "
                         f"{', '.join(ARCHITECTURES)}, or neither for {default_architecture}")
    architecture = architectures[-1] if architectures else default_architecture
    overrides = {name: architecture_overrides(variants[name], architecture) for name in names}
    check_variant_conflicts(overrides)

    config = default_training_config()
    # Generator in data.synthetic.SYNTHETIC_TASKS; "" trains on the text corpus instead.
    config.data.task = task
    # Keyword arguments of the generator besides the sizes (data.seq_len, data.batch_size).
    config.data.task_options = ml_collections.ConfigDict(task_options)
    config.model = model_section(architecture, task_vocab_size(task, task_options))
    # Probes run at every evaluation: "" (none) or "attention" (experiments/birth.py).
    config.train.probes = ""

    for name in names:
        try:
            check_field_paths(config, list(overrides[name]))
        except ValueError as error:
            raise ValueError(f"config variant {name!r} does not apply to the {architecture} "
                             f"model: {error}") from None
        for dotted, value in overrides[name].items():
            set_field(config, dotted, value, source=f"config variant {name!r}")
    config.lock()
    validate_task_config(config)
    return config


def architecture_overrides(overrides: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Return a variant's dotted-path overrides for `architecture`: its own, and those nested
    under the architecture's name, which replace them."""
    flat = {dotted: value for dotted, value in overrides.items() if dotted not in ARCHITECTURES}
    return {**flat, **overrides.get(architecture, {})}


def check_variant_conflicts(overrides: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError naming both variants, the field and both values when two named variants
    set one field to different values. The base variant "" is meant to be overridden."""
    first_setter: dict[str, tuple[str, Any]] = {}
    for name, fields in overrides.items():
        if name == "":
            continue
        for dotted, value in fields.items():
            first_name, first_value = first_setter.setdefault(dotted, (name, value))
            if first_value != value:
                raise ValueError(
                    f"config variants {first_name!r} and {name!r} set {dotted} to different "
                    f"values, {first_value!r} and {value!r}; allowed: one of the two variants, "
                    f"and --config.{dotted}=VALUE to set the field")
