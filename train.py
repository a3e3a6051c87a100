"""Train a byte-level language model; resume from the workdir's latest checkpoint if it has one.

    python train.py --config=configs/mamba_lm.py --workdir=runs/mamba
    python train.py --config=configs/transformer_lm.py:tiny --workdir=/tmp/tiny \\
        --config.train.num_steps=50

The config file's `get_config(variant)` builds the config; `--config.SECTION.FIELD=VALUE`
overrides one field. SIGTERM or Ctrl-C saves a checkpoint and exits with status 0; running the
same command again continues the run. Metrics go to WORKDIR/metrics.jsonl and WORKDIR/tensorboard.

Multi-host jobs run the same command in every process. Under SLURM and on Cloud TPU pods the
processes find each other from the cluster's variables; elsewhere add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (HOST: the machine of process 0).
"""

import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import training
from training import config as config_lib
from training import distributed
from training import host_memory
from training.metrics import QuietLibraries

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/NAME.py[:VARIANT].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, config.json, metrics.jsonl and TensorBoard files.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's coordinator service, for a multi-process run outside SLURM and "
    "TPU pods.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 to num_processes - 1 (0 hosts the coordinator).")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for every process to join a multi-process run before exiting with an error.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help


def _flag_values(argv: list[str], name: str) -> list[str]:
    """Return the values of `--name=value` and `--name value` in `argv`."""
    values = []
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
        elif arg == f"--{name}" and index + 1 < len(argv):
            values.append(argv[index + 1])
    return values


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the flags, checking the config file, its variant, every override's field and the
    type of every field of the resulting config.

    config_flags reports these errors with the traceback of the config file's loading; here each
    one becomes a single message and exit status 2.
    """
    try:
        config = None
        for spec in _flag_values(argv, "config"):
            config = config_lib.load_config_file(spec)
            overrides = [arg[len("--config."):].split("=", 1)[0]
                         for arg in argv if arg.startswith("--config.")]
            config_lib.check_field_paths(config, overrides)
        late_overrides, passed = _late_overrides(argv, config)
        remaining = flags.FLAGS(passed)
        if len(remaining) > 1:
            raise ValueError(f"unexpected arguments: {' '.join(remaining[1:])}; every setting "
                             "is a --flag")
        if _CONFIG.value is not None:
            for dotted, text in late_overrides.items():
                _set_late_override(_CONFIG.value, dotted, text)
            config_lib.check_config_fields(_CONFIG.value)
        return remaining
    except (ValueError, flags.Error) as error:
        sys.stderr.write(f"train.py: invalid flags: {_flag_error_message(error)}\n")
        sys.exit(2)


def _late_overrides(argv: list[str], config: ml_collections.ConfigDict | None
                    ) -> tuple[dict[str, str], list[str]]:
    """Split off the `--config.FIELD=VALUE` overrides that train.py sets after parsing.

    ml_collections cannot parse None for a typed field (`--config.model.ffn_dim=None`, "use the
    default"), and it parses a float field that a config file set to an integer
    (`rope_base = 10000`) as an integer. Those overrides are set after parsing. As on the
    command line, the last override of a field wins. Returns {field: value text} and the
    arguments left for absl.
    """
    late, passed = {}, []
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            dotted, text = arg[len("--config."):].split("=", 1)
            if text == "None" or (config is not None and _is_float_holding_int(config, dotted)):
                late[dotted] = text
                continue
            late.pop(dotted, None)
        passed.append(arg)
    return late, passed


def _is_float_holding_int(config: ml_collections.ConfigDict, dotted: str) -> bool:
    value = config
    for part in dotted.split("."):
        if not isinstance(value, ml_collections.ConfigDict) or part not in value:
            return False
        value = value[part]
    kinds = config_lib.expected_type(config, dotted) or ()
    return (float in kinds and int not in kinds and isinstance(value, int)
            and not isinstance(value, bool))


def _set_late_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set an override split off by `_late_overrides`."""
    source = f"--config.{dotted}={text}"
    if text == "None":
        config_lib.set_field(config, dotted, None, source=source)
        return
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"flag {source}: expected a number, got {text!r}") from None
    # The config file's integer made ml_collections type the field as int, but the field is a
    # float field of the model or training config.
    with config.ignore_type():
        config_lib.set_field(config, dotted, value, source=source)


def _flag_error_message(error: Exception) -> str:
    """Return the message of a flag error, naming the expected type of a malformed override.

    ml_collections passes on the ValueError of Python's own parsers, which prints a tuple for
    booleans and "invalid literal for int() with base 10" for integers.
    """
    cause = error.__cause__ or error.__context__
    if not (isinstance(error, flags.IllegalFlagValueError) and isinstance(cause, ValueError)):
        return str(error)
    flag = str(error).split(": ", 1)[0]
    if len(cause.args) == 2 and "boolean" in str(cause.args[0]):
        return f"{flag}: expected true or false, got {cause.args[1]!r}"
    for pattern, expected in ((r"invalid literal for int\(\) with base 10: (.*)", "an integer"),
                              (r"could not convert string to float: (.*)", "a number")):
        match = re.fullmatch(pattern, str(cause))
        if match:
            return f"{flag}: expected {expected}, got {match.group(1)}"
    return str(error)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietLibraries())
    # Before JAX starts its backend: its threads pick their malloc arena on first use.
    host_memory.apply_flag()
    try:
        # Before any JAX computation: the distributed runtime must exist when devices are listed.
        distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value, timeout_s=_INITIALIZATION_TIMEOUT.value)
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, training.TrainingDivergedError) as error:
        logging.error("%s", error)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C reaches this point only before the training loop, which turns it into a
        # checkpoint and a clean stop.
        logging.error("interrupted while starting, before the first training step; nothing "
                      "was written to the checkpoints")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
