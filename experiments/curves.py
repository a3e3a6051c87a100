"""Plot a validation metric against the training step for several runs, and print it as a table.

    python -m experiments.curves --workdirs=runs/copying_mamba,runs/copying_nonselective \\
        --metric=accuracy --output=runs/results/selective_copying/accuracy_by_step.png
"""

import sys
from pathlib import Path

from absl import app, flags

from training import outputs
from training.checkpoint import CONFIG_FILE, load_config
from training.metrics import read_metrics
from training.tasks import task_name

# Fields of every metrics record that are not metrics.
RECORD_FIELDS = ("step", "split")


def metric_by_step(workdir: str, metric: str) -> dict[int, float]:
    """Return {step: value} of `metric` in the "val" records of a run."""
    records = read_metrics(workdir, "val")
    if not records or metric not in records[-1]:
        raise ValueError(f"no validation metric {metric!r} in {workdir!r}/metrics.jsonl")
    return {record["step"]: record[metric] for record in records if metric in record}


def plot_curves(workdirs: list[str], metric: str, output_path: Path) -> str:
    """Plot `metric` against the step for every run; return a Markdown table of the values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {Path(workdir).name: metric_by_step(workdir, metric) for workdir in workdirs}
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        axis.plot(list(values), list(values.values()), marker="o", label=name)
    axis.set(xlabel="training step", ylabel=f"validation {metric}")
    axis.legend()
    figure.tight_layout()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=110)
    plt.close(figure)

    steps = sorted({step for values in curves.values() for step in values})
    lines = ["| step | " + " | ".join(curves) + " |", "|" + " --- |" * (len(curves) + 1)]
    for step in steps:
        cells = [f"{values[step]:.4f}" if step in values else "" for values in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("workdirs", None, "Training workdirs of synthetic-task runs to compare.",
                      flag_values=flag_values)
    flags.DEFINE_string("metric", "accuracy", "Name of the validation metric in metrics.jsonl.",
                        flag_values=flag_values)
    flags.DEFINE_string("output", "runs/results/curves.png",
                        "Path of the plot, with an image extension such as .png, .pdf or .svg; "
                        "its folder is created if missing. The table goes to the same path with "
                        "the suffix .md.", flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> Path:
    """Return the --output path, after checking every flag and run and creating its folder.

    Raises app.UsageError naming the flag.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flag_values.workdirs:
        raise app.UsageError("--workdirs is empty; pass training workdirs of synthetic-task runs, "
                             "separated by commas")
    metrics_by_run = {workdir: validation_metric_names(workdir)
                      for workdir in flag_values.workdirs}
    metric = flag_values.metric
    allowed = sorted(set.intersection(*metrics_by_run.values()))
    if metric not in allowed:
        missing = [workdir for workdir, names in metrics_by_run.items() if metric not in names]
        raise app.UsageError(f"--metric={metric!r} is not a validation metric of "
                             f"{', '.join(repr(workdir) for workdir in missing)}; allowed (the "
                             f"metrics of every run): {', '.join(allowed) or 'none'}")
    return prepare_output(flag_values.output)


def validation_metric_names(workdir: str) -> set[str]:
    """Return the metric names in the last validation record of a synthetic-task run.

    Raises app.UsageError for a missing folder, a text run, or a run without validation records.
    """
    if not Path(workdir).is_dir():
        raise app.UsageError(f"--workdirs: {workdir!r} not found or not a folder")
    if (Path(workdir) / CONFIG_FILE).is_file():
        try:
            is_text_run = task_name(load_config(workdir)) == ""
        except ValueError as error:
            raise app.UsageError(f"--workdirs: {error}") from None
        if is_text_run:
            raise app.UsageError(f"--workdirs: {workdir!r} is a text run (its config has "
                                 "data.task ''); experiments.curves plots synthetic-task runs, so "
                                 "plot it with python -m training.plot")
    try:
        records = read_metrics(workdir, "val")
    except ValueError as error:
        raise app.UsageError(f"--workdirs: {error}") from None
    if not records:
        raise app.UsageError(f"--workdirs: {workdir!r} has no validation records in its "
                             "metrics.jsonl yet")
    return set(records[-1]) - set(RECORD_FIELDS)


def prepare_output(output: str) -> Path:
    """Check the --output path of the image and create its folder; return the path."""
    try:
        return outputs.prepare_image_path(output, "output", companions=(".md",))
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def main(argv: list[str]) -> None:
    try:
        output = check_flags(flags.FLAGS, argv)
    except app.UsageError as error:  # One line, without absl's usage text.
        sys.exit(f"experiments.curves: error: {error}")
    table = plot_curves(flags.FLAGS.workdirs, flags.FLAGS.metric, output)
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdirs"])
    app.run(main)
