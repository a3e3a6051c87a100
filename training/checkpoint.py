"""Checkpoints (orbax) and the saved config of a run, and `load_run` for notebooks.

A workdir holds:

  config.json         the full config of the run, written when the run starts
  checkpoints/<step>/ orbax checkpoints of the training state (step, params, optimizer state)
  run.lock            locked while a run trains there, so that a second run is rejected

The batch order is a pure function of (seed, step), so the step stored in a checkpoint is also
the data position: a resumed run reads exactly the batches that it would have read without the
interruption. Every process of a multi-host run takes part in saving and restoring. A restore
places each array by the shardings of its template, so a checkpoint written on one mesh (say 2
processes with 2 devices each) resumes on another (1 process with 2 devices).
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from models.registry import build_model
from training import config as config_lib
from training.optimizer import build_optimizer, learning_rate_schedule
from training.steps import TrainState, create_train_state

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "run.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `workdir` during a run, or raise ValueError if a run holds it.

    The lock is an advisory `flock` on `run.lock`, which the operating system releases when the
    process ends, so a killed run leaves no stale lock. It may not work on network filesystems.
    """
    path = Path(workdir) / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ValueError(f"workdir {str(workdir)!r} is in use by another training run "
                             f"(process {holder} holds {path}); wait for it to end or pass "
                             "another --workdir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def checkpoint_manager(workdir: str | os.PathLike, *, keep: int) -> ocp.CheckpointManager:
    """Open (creating if needed) the checkpoint folder of `workdir`, keeping the last `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def _saved_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "rest": state.rest,
            "opt_state": state.opt_state}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> int:
    """Start saving `state` under its step (unless a checkpoint of that step exists); return the
    step.

    The save runs in the background. Raises ValueError if this save or the one before it fails.
    """
    step = int(jax.device_get(state.step))
    if step not in manager.all_steps():
        with _reporting_save_errors(manager):
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_tree(state))))
    return step


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    """Wait until the background save is complete; raise ValueError if it failed."""
    with _reporting_save_errors(manager):
        manager.wait_until_finished()


@contextlib.contextmanager
def _reporting_save_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Turn a failed save (a full disk, a folder removed) into one ValueError naming its cause
    and the last complete checkpoint."""
    try:
        yield
    except Exception as error:  # TensorStore and orbax raise several types for failed writes.
        folder = Path(manager.directory)
        complete = sorted(int(entry.name) for entry in folder.iterdir()
                          if entry.is_dir() and entry.name.isdigit()) if folder.is_dir() else []
        last_complete = (f"the checkpoint of step {complete[-1]} is complete and kept"
                         if complete else "no checkpoint is complete")
        raise ValueError(f"failed to save a checkpoint in {folder} ({_root_reason(error)}); "
                         f"{last_complete}. Fix the cause and run the same command to resume."
                         ) from error


def _root_reason(error: Exception) -> str:
    """Return the first line of the innermost cause of `error`, which names the failed file."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    reason = (str(root).strip() or type(root).__name__).splitlines()[0]
    # TensorStore appends its whole JSON spec (thousands of characters) to the reason.
    return reason.split(" [tensorstore_spec", 1)[0]


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState,
                       step: int | None = None) -> TrainState:
    """Restore checkpoint `step` (default: the latest) into the structure and shardings of
    `template`, which may hold arrays or `jax.ShapeDtypeStruct`s.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint found under {manager.directory}")
    if step not in manager.all_steps():
        saved_steps = ", ".join(str(saved) for saved in manager.all_steps())
        raise ValueError(f"no checkpoint of step {step} under {manager.directory}; "
                         f"saved steps: {saved_steps}")

    def target(leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))

    abstract_tree = jax.tree.map(target, _saved_tree(template))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_tree)))["state"]
    except Exception as error:  # TensorStore and orbax raise several types for unreadable files.
        # NOTE: after this error, the process may still print "Event loop is closed" tracebacks
        # at exit. They come from reads still in flight when orbax closed its event loop.
        earlier = [saved for saved in manager.all_steps() if saved < step]
        fallback = (f"move that folder out of the workdir to resume from step {max(earlier)}"
                    if earlier else "there is no earlier checkpoint; start a new workdir")
        folder = Path(manager.directory) / str(step)
        raise ValueError(f"failed to read the checkpoint of step {step} in {folder} "
                         f"({_root_reason(error)}); "
                         f"{fallback}") from error
    return template.replace(step=restored["step"], params=restored["params"],
                            rest=restored["rest"], opt_state=restored["opt_state"])


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Write the run's config beside its checkpoints (replacing the file in one rename)."""
    path = Path(workdir) / CONFIG_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(config.to_json(indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# Sections of every saved config.json that loading and resuming read.
SAVED_SECTIONS = ("data", "model", "optimizer", "train")


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read the config that a run saved in `workdir`.

    Optimizer fields added after the run was saved get their defaults, which reproduce the
    behaviour of the version that saved it.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"no {CONFIG_FILE} in workdir {str(workdir)!r}; is it a training workdir?")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON config ({error}); restore it, or "
                         "start the run in a new workdir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} contains a JSON {type(saved).__name__}, not a config object; "
                         "restore it, or start the run in a new workdir")
    for section in SAVED_SECTIONS:
        if not isinstance(saved.get(section), dict):
            found = "no" if section not in saved else f"a JSON {type(saved[section]).__name__} as"
            raise ValueError(f"{path} has {found} section {section!r}, where a saved config has "
                             "an object. Restore it, or start the run in a new workdir.")
    config = ml_collections.ConfigDict(saved)
    if "optimizer" in config:
        for name, value in config_lib.default_training_config().optimizer.items():
            if name not in config.optimizer:
                config.optimizer[name] = value
    return config


def check_resumable(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Raise ValueError if the checkpoints in `workdir` cannot resume `config`.

    The model config must be the one saved, except the fields of `COMPUTATION_FIELDS` (the
    scan implementation). Other sections may change on resume (for example more steps or a new
    evaluation interval), unless the optimizer fields change the structure of the optimizer
    state, as `optimizer.frozen_parameters` does.
    """
    if not (Path(workdir) / CONFIG_FILE).is_file():
        raise ValueError(
            f"workdir {str(workdir)!r} contains checkpoints but no {CONFIG_FILE}, the saved config "
            "that a resumed run is checked against. Restore the file from a copy, or use a new "
            "workdir.")
    saved = load_config(workdir)
    _check_same_model(workdir, saved, config)
    saved_optimizer = jax.tree.structure(abstract_train_state(saved).opt_state)
    if jax.tree.structure(abstract_train_state(config).opt_state) != saved_optimizer:
        differences = config_lib.differing_model_fields(saved.optimizer.to_dict(),
                                                        config.optimizer.to_dict())
        raise ValueError(
            f"workdir {str(workdir)!r} contains checkpoints whose optimizer state has another "
            f"structure than these optimizer settings give; differing optimizer fields (saved -> "
            f"requested): {'; '.join(differences)}. Resume with the saved values, or use a new "
            "workdir.")


# Model fields that choose how the model computes, not what it is: a run may resume with others.
COMPUTATION_FIELDS = ("scan", "chunk_size")


def _check_same_model(workdir, saved: ml_collections.ConfigDict,
                      config: ml_collections.ConfigDict) -> None:
    saved_fields, current_fields = (
        {name: value for name, value in config_lib.model_fields(fields).items()
         if name not in COMPUTATION_FIELDS}
        for fields in (saved, config))
    if saved_fields.get("architecture") != current_fields.get("architecture"):
        # Every other field would differ too, so name only the architecture.
        saved_fields = {"architecture": saved_fields.get("architecture")}
        current_fields = {"architecture": current_fields.get("architecture")}
    differences = config_lib.differing_model_fields(saved_fields, current_fields)
    if differences:
        raise ValueError(
            f"workdir {str(workdir)!r} contains checkpoints of a different model; differing model "
            f"fields (saved -> requested): {'; '.join(differences)}. Use a new workdir, or the "
            "saved model config to resume.")


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Return the training state's shapes and dtypes for `config`, allocating no arrays."""
    def build() -> TrainState:
        model = build_model(config.model, rngs=nnx.Rngs(config.train.seed))
        return create_train_state(
            model, build_optimizer(config.optimizer, config.train.num_steps),
            learning_rate_schedule(config.optimizer, config.train.num_steps))

    return jax.eval_shape(build)


def load_run(workdir: str | os.PathLike, step: int | None = None
             ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """Return the model of a training run with restored parameters, and the run's config.

    `step` selects a checkpoint (default: the latest). In a notebook:

        from training import load_run
        model, config = load_run("runs/mamba")
        logits = model(tokens)  # (b, t) int32 byte tokens -> (b, t, vocab_size)
    """
    config = load_config(workdir)
    template = abstract_train_state(config)
    manager = checkpoint_manager(workdir, keep=config.train.keep_checkpoints)
    try:
        state = restore_checkpoint(manager, template, step)
    finally:
        manager.close()
    return state.model(), config
