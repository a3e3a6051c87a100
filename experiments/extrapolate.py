"""Evaluate models trained on a synthetic task at other sequence lengths (length extrapolation).

The table has the form of Table 11 of Gu & Dao 2023 ("Mamba"): one row per trained model, one
column per test length, accuracy in percent at the scored positions. Mamba evaluates sequences
longer than `--chunk_len` with its recurrent state: `LanguageModel.prefill` over chunks of
`--chunk_len` tokens, so memory does not grow with the length. The Transformer runs its full
causal attention, and a length whose attention weights would exceed `--max_attention_gib` (or
whose run fails to allocate memory) is reported as out of memory.

    python -m experiments.extrapolate --workdirs=runs/induction_mamba,runs/induction_transformer \\
        --output_dir=runs/results/induction_heads

writes `extrapolation.json`, `extrapolation.csv`, `extrapolation.md` and `extrapolation.png`.
"""

import csv
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from data.synthetic import SYNTHETIC_TASKS
from training import load_run, outputs
from training.checkpoint import CHECKPOINT_DIR, load_config
from training.metrics import QuietLibraries
from training.tasks import TaskData, task_name

# `process_index` of the batches generated here: neither training (processes 0, 1, ...) nor
# validation (training.tasks.VALIDATION_STREAM) uses it.
EXTRAPOLATION_STREAM = (1 << 20) + 2
OUT_OF_MEMORY = "out of memory"


def sequences_for_length(length: int, *, max_tokens: int, min_sequences: int,
                         max_sequences: int) -> int:
    """Return how many sequences to evaluate at `length`: max_tokens // length, clipped."""
    return int(min(max(max_tokens // length, min_sequences), max_sequences))


def attention_bytes(config: ml_collections.ConfigDict, batch_size: int, length: int) -> int:
    """Estimate the bytes of one layer's float32 attention scores and weights (b, h, t, t)."""
    return 2 * 4 * batch_size * config.model.num_heads * length * length


def _scored_counts(logits_btv, targets_bt, mask_bt):
    correct = (jnp.argmax(logits_btv, axis=-1) == targets_bt) & mask_bt
    return jnp.sum(correct, dtype=jnp.int32), jnp.sum(mask_bt, dtype=jnp.int32)


class ModelEvaluator:
    """Count correct predictions at the scored positions of task batches, compiled once per shape."""

    def __init__(self, model: nnx.Module, chunk_len: int):
        self.graphdef, self.state = nnx.split(model)
        self.chunk_len = chunk_len
        self.recurrent = not hasattr(model.blocks[0], "attention")

        def full(state, inputs_bt, targets_bt, mask_bt):
            logits_btv = nnx.merge(self.graphdef, state)(inputs_bt)
            return _scored_counts(logits_btv, targets_bt, mask_bt)

        def chunk(state, cache, inputs_bt, targets_bt, mask_bt):
            logits_btv, cache = nnx.merge(self.graphdef, state).prefill(inputs_bt, cache)
            return _scored_counts(logits_btv, targets_bt, mask_bt), cache

        self._full = jax.jit(full)
        self._chunk = jax.jit(chunk)

    def counts(self, batch: dict[str, np.ndarray]) -> tuple[int, int]:
        """Return (correct, scored) over a batch, chunked for a recurrent model when it is long."""
        length = batch["inputs"].shape[1]
        if not self.recurrent or length <= self.chunk_len:
            correct, scored = self._full(self.state, batch["inputs"], batch["targets"],
                                         batch["loss_mask"])
            return int(correct), int(scored)

        model = nnx.merge(self.graphdef, self.state)
        cache = model.init_cache(batch["inputs"].shape[0], length)
        correct, scored = 0, 0
        # Lengths here are powers of two and so is chunk_len, but a last partial chunk is
        # still correct: it compiles once more for its own shape.
        for start in range(0, length, self.chunk_len):
            window = slice(start, start + self.chunk_len)
            (chunk_correct, chunk_scored), cache = self._chunk(
                self.state, cache, batch["inputs"][:, window], batch["targets"][:, window],
                batch["loss_mask"][:, window])
            correct += int(chunk_correct)
            scored += int(chunk_scored)
        return correct, scored


def evaluate_lengths(model: nnx.Module, config: ml_collections.ConfigDict, lengths: list[int], *,
                     seed: int = 0, max_tokens: int = 1 << 19, min_sequences: int = 4,
                     max_sequences: int = 64, batch_size: int = 16, chunk_len: int = 4096,
                     max_attention_gib: float = 2.0) -> list[dict]:
    """Return per length the accuracy at the scored positions of fresh task batches.

    Each result has `length`, `sequences`, `accuracy` (None when not measured), `status` ("ok" or
    "out of memory") and `seconds`. Batches come from the config's task and task options with
    `seq_len` replaced by the length.
    """
    source = TaskData(config)
    evaluator = ModelEvaluator(model, chunk_len)
    results = []
    for length in lengths:
        num_sequences = sequences_for_length(length, max_tokens=max_tokens,
                                             min_sequences=min_sequences,
                                             max_sequences=max_sequences)
        rows = min(batch_size, num_sequences)
        result = {"length": length, "sequences": num_sequences, "accuracy": None,
                  "status": "ok", "seconds": 0.0}
        if not evaluator.recurrent:
            needed = attention_bytes(config, rows, length)
            if needed > max_attention_gib * 2**30:
                result["status"] = OUT_OF_MEMORY
                result["note"] = (f"attention weights need about {needed / 2**30:.1f} GiB per "
                                  f"layer for {rows} sequences, over --max_attention_gib="
                                  f"{max_attention_gib}")
                results.append(result)
                logging.info("length %d: %s", length, result["note"])
                continue

        start_time = time.perf_counter()
        correct, scored = 0, 0
        try:
            for index in range(math.ceil(num_sequences / rows)):
                batch = source.generate(seed, index, EXTRAPOLATION_STREAM, rows, seq_len=length)
                batch_correct, batch_scored = evaluator.counts(batch)
                correct += batch_correct
                scored += batch_scored
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            result["status"] = OUT_OF_MEMORY
            result["note"] = str(error).splitlines()[0]
        else:
            result["accuracy"] = correct / scored
        result["seconds"] = time.perf_counter() - start_time
        logging.info("length %d: %s over %d sequences (%.1f s)", length,
                     "n/a" if result["accuracy"] is None else f"{result['accuracy']:.4f}",
                     num_sequences, result["seconds"])
        results.append(result)
    return results


def run_label(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Return a row label such as "Mamba (selective)" or "Transformer (rope)"."""
    model = config.model
    if model.architecture == "mamba":
        kind = "selective" if model.get("selective", True) else "time-invariant"
        return f"Mamba ({kind}) [{Path(workdir).name}]"
    return f"Transformer ({model.get('positions', 'rope')}) [{Path(workdir).name}]"


def format_table(rows: list[dict], lengths: list[int]) -> str:
    """Return a Markdown table: one row per model, accuracy in percent per length."""
    header = "| model | train length | " + " | ".join(_length_label(n) for n in lengths) + " |"
    lines = [header, "|" + " --- |" * (len(lengths) + 2)]
    for row in rows:
        by_length = {result["length"]: result for result in row["results"]}
        cells = []
        for length in lengths:
            result = by_length.get(length)
            if result is None:
                cells.append("")  # Not evaluated (yet).
            elif result["accuracy"] is None:
                cells.append("OOM")
            else:
                cells.append(f"{100 * result['accuracy']:.1f}")
        lines.append(f"| {row['label']} | {row['train_length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _length_label(length: int) -> str:
    exponent = math.log2(length)
    return f"2^{int(exponent)}" if exponent.is_integer() else str(length)


def plot_rows(rows: list[dict], output_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for row in rows:
        measured = [result for result in row["results"] if result["accuracy"] is not None]
        line, = axis.plot([result["length"] for result in measured],
                          [100 * result["accuracy"] for result in measured], marker="o",
                          label=row["label"])
        axis.axvline(row["train_length"], color=line.get_color(), linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set(xlabel="test sequence length (dotted: training length)", ylabel="accuracy (%)",
             ylim=(-2, 102), title="length extrapolation")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)


def write_outputs(rows: list[dict], lengths: list[int], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "extrapolation.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(output_dir / "extrapolation.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "train_length", "length", "sequences", "accuracy", "status",
                         "seconds"])
        for row in rows:
            for result in row["results"]:
                writer.writerow([row["label"], row["train_length"], result["length"],
                                 result["sequences"], result["accuracy"], result["status"],
                                 f"{result['seconds']:.1f}"])
    (output_dir / "extrapolation.md").write_text(format_table(rows, lengths))
    plot_rows(rows, output_dir / "extrapolation.png")



def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("workdirs", None, "Training workdirs of synthetic-task runs.",
                      flag_values=flag_values)
    flags.DEFINE_string("output_dir", "runs/results/extrapolation",
                        "Folder for the table, CSV, JSON and plot; created if missing.",
                        flag_values=flag_values)
    flags.DEFINE_list("lengths", [str(2**n) for n in range(6, 21)],
                      "Test sequence lengths in tokens (default 2^6 .. 2^20), each at least the "
                      "task's minimum length.", flag_values=flag_values)
    flags.DEFINE_integer("max_tokens", 1 << 19, "Tokens evaluated per length; the number of "
                         "sequences is max_tokens // length, clipped to the two limits below.",
                         flag_values=flag_values)
    flags.DEFINE_integer("min_sequences", 4, "Fewest sequences per length.",
                         flag_values=flag_values)
    flags.DEFINE_integer("max_sequences", 64, "Most sequences per length.",
                         flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.", flag_values=flag_values)
    flags.DEFINE_integer("chunk_len", 4096, "Tokens per prefill chunk of a recurrent model on "
                         "longer sequences.", flag_values=flag_values)
    flags.DEFINE_float("max_attention_gib", 2.0, "Largest estimated size, in GiB, of one layer's "
                       "attention weights that is run; longer lengths are reported out of memory.",
                       flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the evaluation batches, >= 0.",
                         flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[int]:
    """Return the lengths, after checking every flag and run and creating --output_dir.

    Raises app.UsageError naming the flag, before any model is loaded or evaluated.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    lengths = parse_lengths(flag_values.lengths)
    for name in ("max_tokens", "min_sequences", "max_sequences", "batch_size", "chunk_len"):
        value = getattr(flag_values, name)
        if value < 1:
            raise app.UsageError(f"--{name} must be an integer >= 1, got {value}")
    if flag_values.min_sequences > flag_values.max_sequences:
        raise app.UsageError(f"--min_sequences={flag_values.min_sequences} must not exceed "
                             f"--max_sequences={flag_values.max_sequences}")
    if not flag_values.max_attention_gib > 0:
        raise app.UsageError(f"--max_attention_gib must be > 0, got "
                             f"{flag_values.max_attention_gib}")
    if flag_values.seed < 0:
        raise app.UsageError(f"--seed must be an integer >= 0, got {flag_values.seed}")
    if not flag_values.workdirs:
        raise app.UsageError("--workdirs is empty; pass training workdirs of synthetic-task runs, "
                             "separated by commas")
    for workdir in flag_values.workdirs:
        check_run(workdir, lengths, flag_values.seed)
    try:
        outputs.prepare_output_dir(flag_values.output_dir, "output_dir")
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    return lengths


def parse_lengths(values: list[str]) -> list[int]:
    """Return the --lengths values as integers; raise app.UsageError unless all are >= 1."""
    if not values:
        raise app.UsageError("--lengths is empty; pass sequence lengths in tokens, separated by "
                             "commas")
    try:
        lengths = [int(value) for value in values]
    except ValueError:
        raise app.UsageError(f"--lengths must be a comma-separated list of integers, got "
                             f"{','.join(values)}") from None
    if min(lengths) < 1:
        raise app.UsageError(f"--lengths must list integers >= 1, got {','.join(values)}")
    return lengths


def check_run(workdir: str, lengths: list[int], seed: int) -> None:
    """Raise app.UsageError unless `workdir` is a trained synthetic-task run whose task can
    generate sequences of every length in `lengths`.
    """
    if not Path(workdir).is_dir():
        raise app.UsageError(f"--workdirs: {workdir!r} not found or not a folder")
    try:
        config = load_config(workdir)
    except ValueError as error:
        raise app.UsageError(f"--workdirs: {error}") from None

    allowed_tasks = ", ".join(SYNTHETIC_TASKS)
    if task_name(config) == "":
        raise app.UsageError(f"--workdirs: {workdir!r} is a text run (its config has data.task "
                             f"''); experiments.extrapolate needs a run of a synthetic task: "
                             f"{allowed_tasks}")
    try:
        source = TaskData(config)
    except ValueError as error:
        raise app.UsageError(f"--workdirs: the config of {workdir!r} is invalid: {error}") from None

    checkpoints = Path(workdir) / CHECKPOINT_DIR
    if not checkpoints.is_dir() or not any(child.name.isdigit() for child in checkpoints.iterdir()):
        raise app.UsageError(f"--workdirs: {workdir!r} has no checkpoint under {checkpoints}; "
                             "train the run first")

    # The generators only set a lower bound on the length, and TaskData has already generated
    # a sequence of the training length, so only a shorter length needs a check.
    shortest = min(lengths)
    if shortest < config.data.seq_len:
        try:
            source.generate(seed, 0, EXTRAPOLATION_STREAM, 1, seq_len=shortest)
        except ValueError as error:
            raise app.UsageError(f"--lengths={shortest} is too short for the task "
                                 f"{task_name(config)!r} of {workdir!r}: {error}") from None


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(QuietLibraries())
    try:
        lengths = check_flags(flags.FLAGS, argv)
    except app.UsageError as error:  # One line, without absl's usage text.
        sys.exit(f"experiments.extrapolate: error: {error}")
    rows = []
    for workdir in flags.FLAGS.workdirs:
        model, config = load_run(workdir)
        label = run_label(config, workdir)
        logging.info("evaluating %s", label)
        row = {"label": label, "workdir": workdir, "train_length": config.data.seq_len,
               "results": []}
        rows.append(row)
        # One length at a time, writing the outputs after each, so that a long evaluation
        # leaves its finished lengths behind.
        for length in lengths:
            row["results"] += evaluate_lengths(
                model, config, [length], seed=flags.FLAGS.seed,
                max_tokens=flags.FLAGS.max_tokens, min_sequences=flags.FLAGS.min_sequences,
                max_sequences=flags.FLAGS.max_sequences, batch_size=flags.FLAGS.batch_size,
                chunk_len=flags.FLAGS.chunk_len, max_attention_gib=flags.FLAGS.max_attention_gib)
            write_outputs(rows, lengths, Path(flags.FLAGS.output_dir))
    print(format_table(rows, lengths))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdirs"])
    app.run(main)
