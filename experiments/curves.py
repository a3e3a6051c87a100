"""Plot a validation metric against the training step for several runs, and print it as a table.

    python -m experiments.curves --workdirs=runs/copying_mamba,runs/copying_nonselective \\
        --metric=accuracy --output=runs/results/selective_copying/accuracy_by_step.png
"""

from pathlib import Path

from absl import app, flags

from training.metrics import read_metrics


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


def define_flags() -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("workdirs", None, "Training workdirs to compare.")
    flags.DEFINE_string("metric", "accuracy", "Name of the validation metric in metrics.jsonl.")
    flags.DEFINE_string("output", "runs/results/curves.png",
                        "Path of the plot; the table goes to the same path with the suffix .md.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    output = Path(flags.FLAGS.output)
    table = plot_curves(flags.FLAGS.workdirs, flags.FLAGS.metric, output)
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdirs"])
    app.run(main)
