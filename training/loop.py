"""The training run: setup, resume, the step loop, evaluation, checkpoints and clean stops.

`train_and_evaluate(config, workdir)` is what `train.py` calls; each stage is a function of its
own so that a notebook can run them one at a time.
"""

import contextlib
import functools
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import jax
import ml_collections
from absl import logging
from flax import nnx

import data
from models.registry import build_model, count_parameters
from training import checkpoint, tasks
from training.config import validate_config
from training.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, progress_line
from training.optimizer import build_optimizer, learning_rate_schedule
from training.sharding import (build_mesh, global_eval_batch, global_train_batch, replicated,
                               state_shardings)
from training.steps import TrainState, bits_per_byte, create_train_state, train_step


# Entries a run keeps in its workdir: name -> whether the entry is a folder.
WORKDIR_ENTRIES = {checkpoint.CHECKPOINT_DIR: True, TENSORBOARD_DIR: True, METRICS_FILE: False,
                   checkpoint.LOCK_FILE: False, checkpoint.CONFIG_FILE: False}


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm of a step was not finite (NaN or infinity)."""


class StopSignal:
    """Turn SIGTERM and SIGINT into a request to save a checkpoint and stop after this step.

    Handlers are installed on entry and the previous ones restored on exit. Outside the main
    thread Python cannot install signal handlers, so there no signal is caught.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StartupInterrupt:
    """Raise KeyboardInterrupt for Ctrl-C while a run starts, and again on exit if it was lost.

    Python ignores an exception raised inside a garbage-collection callback. A Ctrl-C that lands
    in one would let the run go on, so leaving the block raises it again.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self) -> "StartupInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if exc_type is None and self.received:
            raise KeyboardInterrupt


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Create `workdir` if needed and check that files can be written there."""
    if not str(workdir).strip():
        raise ValueError("workdir is empty; pass --workdir=FOLDER")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {str(workdir)!r} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as error:
        raise ValueError(f"workdir {str(workdir)!r} is not writable ({error.strerror}); "
                         "pass a folder that this user can create files in") from None
    for name, is_folder in WORKDIR_ENTRIES.items():
        entry = path / name
        if entry.exists() and entry.is_dir() != is_folder:
            found, expected = ("file", "folder") if is_folder else ("folder", "file")
            raise ValueError(f"{entry} is a {found}, but a run keeps a {expected} of that name "
                             "there; move it out of the workdir")
        if is_folder and entry.is_dir() and not os.access(entry, os.W_OK | os.X_OK):
            raise ValueError(f"{entry} is not writable; make it writable by this user, or pass "
                             "another workdir")
    return path


def load_training_data(config: ml_collections.ConfigDict) -> data.Corpus:
    """Load the corpus and check that both splits hold at least one window of seq_len + 1."""
    cache_dir = config.data.cache_dir or None
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ValueError(f"invalid config field data.cache_dir={cache_dir!r}: it is a file; "
                         "pass a folder, or \"\" for the default location")
    try:
        corpus = data.load_corpus(config.data.path or None, pattern=config.data.pattern,
                                  val_fraction=config.data.val_fraction, cache_dir=cache_dir)
    except OSError as error:
        raise ValueError(f"cannot read the corpus data.path={config.data.path!r} or write its "
                         f"token cache data.cache_dir={config.data.cache_dir!r}: {error}") from None
    window = config.data.seq_len + 1
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) < window:
            raise ValueError(
                f"corpus {corpus.source!r} has {len(tokens)} {split} tokens, fewer than one "
                f"window of data.seq_len + 1 = {window}; lower data.seq_len, change "
                "data.val_fraction, or use a larger corpus")
    return corpus


def load_data_source(config: ml_collections.ConfigDict) -> tasks.TextData | tasks.TaskData:
    """Return the synthetic task that `data.task` names, or the text corpus when it is empty."""
    if tasks.task_name(config):
        return tasks.TaskData(config)
    return tasks.TextData(load_training_data(config), config)


def initial_train_state(config: ml_collections.ConfigDict, mesh=None) -> TrainState:
    """Build the model and optimizer state of `config` with fresh parameters.

    With a `mesh`, the state is placed on it by the sharding rules of `config.mesh`, which
    replicate it by default. Without a mesh, the state stays on the default device.
    """
    model = build_model(config.model, rngs=nnx.Rngs(config.train.seed))
    num_steps = config.train.num_steps
    state = create_train_state(model, build_optimizer(config.optimizer, num_steps),
                               learning_rate_schedule(config.optimizer, num_steps))
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, config, mesh))


def evaluate(eval_fn, state: TrainState, batches: list[jax.Array], summarize=None
             ) -> dict[str, float]:
    """Return the mean loss in nats per token and bits per byte over the validation batches.

    `summarize` turns the summed outputs of `eval_fn` into metrics; a data source's `summarize`
    adds the accuracy of a synthetic task.
    """
    sums: dict[str, float] = {}
    for batch in batches:
        for name, value in jax.device_get(eval_fn(state, batch)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    if summarize is not None:
        return summarize(sums)
    loss = sums["loss_sum"] / sums["token_count"]
    return {"loss": loss, "bits_per_byte": bits_per_byte(loss)}


def _check_finite(step: int, metrics: dict[str, float], manager) -> None:
    # A finite loss and gradient can still give non-finite parameters (an infinite learning
    # rate, an overflowing update), and those must not reach a checkpoint either.
    for name in ("loss", "grad_norm", "param_norm"):
        if not math.isfinite(metrics[name]):
            last = manager.latest_step()
            kept = ("no checkpoint has been saved yet" if last is None
                    else f"the checkpoint of step {last} is left as it was")
            raise TrainingDivergedError(
                f"{name} is {metrics[name]} at step {step}; stopping before saving anything, "
                f"and {kept}. Lower optimizer.learning_rate or optimizer.grad_clip_norm, or "
                "raise optimizer.warmup_steps.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> TrainState:
    """Train `config` in `workdir`, resuming from its latest checkpoint; return the final state.

    Raises ValueError for invalid settings or inputs before any checkpoint is written, and
    `TrainingDivergedError` when a step's loss or gradient norm is not finite.
    """
    # Setup: every input check runs before the checkpoint folder is opened.
    num_processes = jax.process_count()
    is_writer = jax.process_index() == 0
    if not is_writer:
        logging.set_verbosity(logging.WARNING)  # Progress lines come from process 0 only.
    validate_config(config, num_devices=jax.device_count(), num_processes=num_processes)
    workdir = check_workdir(workdir)
    # Process 0 locks the workdir for the whole run. The other processes of a multi-host run
    # share the workdir with it.
    lock = checkpoint.workdir_lock(workdir) if is_writer else contextlib.nullcontext()
    with lock:
        return _train_in_workdir(config, workdir, is_writer, num_processes)


def _train_in_workdir(config: ml_collections.ConfigDict, workdir: Path, is_writer: bool,
                      num_processes: int) -> TrainState:
    """Run `train_and_evaluate` once the workdir is checked (and locked by process 0)."""
    setup = None
    try:
        with StartupInterrupt():
            setup = _start_run(config, workdir, is_writer, num_processes)
    except KeyboardInterrupt:
        if setup is not None:  # A lost Ctrl-C, raised again once the set-up had finished.
            _, _, _, manager, writer, _ = setup
            writer.close()
            manager.close()
        raise
    return _train(config, workdir, is_writer, *setup)


def _start_run(config, workdir, is_writer, num_processes):
    """Load the data, build the state, restore the latest checkpoint and open the metrics."""
    source = load_data_source(config)
    if (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
        has_checkpoint = any(entry.name.isdigit()
                             for entry in (workdir / checkpoint.CHECKPOINT_DIR).iterdir())
        if has_checkpoint:
            checkpoint.check_resumable(workdir, config)

    # Mesh, model and optimizer.
    mesh = build_mesh(config)
    state = initial_train_state(config, mesh)
    logging.info("model: %s with %s parameters; devices: %d over %d process(es), mesh %s; %s",
                 config.model.architecture, f"{count_parameters(config.model):,}",
                 jax.device_count(), num_processes, dict(mesh.shape), source.describe())

    # Restore.
    manager = checkpoint.checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
    if manager.latest_step() is not None:
        state = checkpoint.restore_checkpoint(manager, state)
        logging.info("resumed from the checkpoint of step %d in %s", int(state.step), workdir)
    # On resume the saved config is replaced only once this run has trained, so a run that fails
    # or has nothing to do leaves the workdir's config.json as it was.
    start_step = int(jax.device_get(state.step))
    if is_writer and not (workdir / checkpoint.CONFIG_FILE).exists():
        checkpoint.save_config(workdir, config)

    writer = MetricsWriter(workdir, enabled=is_writer)
    return source, mesh, state, manager, writer, start_step


def _train(config, workdir, is_writer, source, mesh, state, manager, writer, start_step):
    """Run the training loop and the last save, with `StopSignal` handling SIGTERM and SIGINT."""
    # The handlers stay installed until the last asynchronous save is complete and the files are
    # closed, so that a signal at the end of the run cannot cut the save short.
    with StopSignal() as stop:
        try:
            state = _run_steps(config, state, source, mesh, manager, writer, stop, workdir)
            checkpoint.wait_for_saves(manager)
            if stop.received is not None:
                logging.info("received %s: saved the checkpoint of step %d and stopped",
                             stop.received, int(jax.device_get(state.step)))
            if is_writer and int(jax.device_get(state.step)) > start_step:
                checkpoint.save_config(workdir, config)
        finally:
            writer.close()
            manager.close()
    return state


def _run_steps(config, state, source, mesh, manager, writer, stop, workdir) -> TrainState:
    train, data_config = config.train, config.data
    num_steps = train.num_steps
    tokens_per_step = data_config.batch_size * data_config.seq_len

    shardings = state_shardings(state, config, mesh)
    # With every parameter replicated (plain data parallelism), each device computes its rows'
    # gradients and the sums over devices are a few large all-reduces (training/gradients.py).
    replicated_params = all(all(axis is None for axis in sharding.spec)
                            for sharding in jax.tree.leaves(shardings.params))
    data_parallel_mesh = mesh if replicated_params and mesh.size > 1 else None
    # Fixed output shardings keep the parameters where the sharding rules put them.
    train_fn = jax.jit(functools.partial(train_step, loss_fn=source.loss_fn,
                                         data_parallel_mesh=data_parallel_mesh),
                       donate_argnums=0, out_shardings=(shardings, replicated(mesh)))
    eval_fn = jax.jit(source.eval_fn)
    # Task batches are dicts of (b, t) arrays; each array is placed like a token batch.
    validation = [jax.tree.map(lambda rows: global_eval_batch(rows, mesh), batch)
                  for batch in source.validation_batches(train.eval_batches)]
    accumulation_steps = config.optimizer.accumulation_steps

    step = int(jax.device_get(state.step))
    first_step = step
    start_time = time.perf_counter()
    # Speed counts only the time inside training steps (not evaluation or checkpoints), and
    # leaves out this process's first step, which includes compilation.
    step_seconds, timed_steps = 0.0, 0

    while step < num_steps and stop.received is None:
        step_start = time.perf_counter()
        # Every process draws the whole global batch (process index 0 of the data stream) and
        # places its own rows, so the batches do not depend on the number of processes.
        # NOTE: each host thus reads every window of the step. That is cheap for byte windows,
        # but a data source with costly rows would need a random stream per row instead.
        batch = source.train_batch(train.seed, step, 0, data_config.batch_size)
        state, metrics = train_fn(state, jax.tree.map(
            lambda rows: global_train_batch(rows, accumulation_steps, mesh), batch))
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        step += 1
        _check_finite(step, metrics, manager)
        if source.tokens_are_bytes:
            metrics["bits_per_byte"] = bits_per_byte(metrics["loss"])

        now = time.perf_counter()
        if step > first_step + 1:
            step_seconds += now - step_start
            timed_steps += 1
        writer.write(step, "train", {**metrics, "tokens": step * tokens_per_step,
                                     "elapsed_s": now - start_time})

        if step - first_step <= train.log_first_steps or step % train.log_every == 0:
            speed, eta = None, None
            if timed_steps:
                seconds_per_step = step_seconds / timed_steps
                speed = tokens_per_step / seconds_per_step
                eta = seconds_per_step * (num_steps - step)
                step_seconds, timed_steps = 0.0, 0
            logging.info(progress_line(step, num_steps, metrics, speed, eta))

        if step % train.eval_every == 0 or step == num_steps:
            evaluation = evaluate(eval_fn, state, validation, source.summarize)
            evaluation.update(source.probes(state, step, workdir, is_writer=writer.enabled))
            _log_evaluation(step, evaluation, writer)
        if step % train.checkpoint_every == 0 or step == num_steps:
            checkpoint.save_checkpoint(manager, state)

    if stop.received is not None:
        checkpoint.save_checkpoint(manager, state)
    elif step == first_step:
        logging.info("nothing to do: the checkpoint is at step %d of train.num_steps=%d",
                     step, num_steps)
    return state


def _log_evaluation(step: int, metrics: dict[str, float], writer: MetricsWriter) -> None:
    writer.write(step, "val", metrics)
    if "accuracy" in metrics:
        logging.info("validation at step %d: loss %.4f | accuracy %.4f", step, metrics["loss"],
                     metrics["accuracy"])
    else:
        logging.info("validation at step %d: loss %.4f | %.3f bits/byte", step, metrics["loss"],
                     metrics["bits_per_byte"])

