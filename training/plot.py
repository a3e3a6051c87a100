"""Plot the learning curves of one or more runs and print a summary table.

    python -m training.plot runs/mamba runs/transformer --out curves.png

The left panel shows training bits per byte (a moving average over `--smooth` steps) against
tokens seen; the right panel shows validation bits per byte. The table lists, per run, the final
validation bits per byte and the mean training throughput.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only; no display is needed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from training import outputs  # noqa: E402
from training.metrics import read_metrics  # noqa: E402


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Return the mean of each `window` consecutive values (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    starts = np.arange(1, len(values) + 1) - counts
    return (cumulative[1:] - cumulative[starts]) / counts


def run_summary(workdir: str | Path) -> dict[str, float | None]:
    """Return the last step, final validation bits per byte and mean tokens per second of a run.

    Throughput is tokens over wall time between consecutive logged steps, so the time spent in
    evaluation and checkpoints counts, while gaps between a stop and a resume do not.
    """
    train = read_metrics(workdir, "train")
    val = read_metrics(workdir, "val")
    if not train:
        raise ValueError(f"{str(workdir)!r} has no training records in metrics.jsonl")
    if any("bits_per_byte" not in record for record in train[-1:] + val[-1:]):
        raise ValueError(f"{str(workdir)!r} is a synthetic-task run, whose metrics have accuracy "
                         "instead of bits per byte; plot it with python -m experiments.curves")
    tokens = np.array([record["tokens"] for record in train], dtype=np.float64)
    elapsed = np.array([record["elapsed_s"] for record in train], dtype=np.float64)
    # A resumed run restarts its clock: keep only intervals where the clock moved forwards.
    seconds = np.diff(elapsed)
    forwards = seconds > 0
    throughput = (float(np.diff(tokens)[forwards].sum() / seconds[forwards].sum())
                  if forwards.any() else None)
    return {"step": train[-1]["step"],
            "val_bits_per_byte": val[-1]["bits_per_byte"] if val else None,
            "tokens_per_second": throughput}


def plot_runs(workdirs: list[str], out: str, smooth: int) -> None:
    """Draw training and validation bits per byte of `workdirs` into the image file `out`."""
    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for workdir in workdirs:
        label = Path(workdir).name
        train = read_metrics(workdir, "train")
        tokens = np.array([record["tokens"] for record in train])
        bits = np.array([record["bits_per_byte"] for record in train])
        train_axis.plot(tokens, moving_average(bits, smooth), label=label)
        val = read_metrics(workdir, "val")
        if val:
            val_axis.plot([record["step"] * (tokens[0] / train[0]["step"]) for record in val],
                          [record["bits_per_byte"] for record in val], marker="o", label=label)
    for axis, title in ((train_axis, f"training (mean of {smooth} steps)"),
                        (val_axis, "validation")):
        axis.set_title(title)
        axis.set_xlabel("tokens seen")
        axis.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M: readable tick labels
        axis.grid(alpha=0.3)
        axis.legend()
    train_axis.set_ylabel("bits per byte")
    figure.tight_layout()
    try:
        figure.savefig(out, dpi=120)
    except OSError as error:
        raise ValueError(f"cannot write --out {str(out)!r}: {error.strerror}") from None


def prepare_out(out: str) -> str | None:
    """Check the --out image path and create its folder; return an error message or None."""
    try:
        outputs.prepare_image_path(out, "out")
    except ValueError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (with metrics.jsonl)")
    parser.add_argument("--out", default="curves.png",
                        help="image file to write (PNG, PDF, SVG); its folder is created if "
                        "missing")
    parser.add_argument("--smooth", type=int, default=20,
                        help="training steps in the moving average of the left panel")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    out_error = prepare_out(args.out)
    if out_error:
        parser.error(out_error)

    try:
        summaries = [run_summary(workdir) for workdir in args.workdirs]
        print(f"{'run':<30} {'step':>7} {'val bits/byte':>14} {'tokens/s':>10}")
        for workdir, summary in zip(args.workdirs, summaries):
            val = summary["val_bits_per_byte"]
            speed = summary["tokens_per_second"]
            print(f"{Path(workdir).name:<30} {summary['step']:>7} "
                  f"{'-' if val is None else f'{val:.3f}':>14} "
                  f"{'-' if speed is None else f'{speed:,.0f}':>10}")
        plot_runs(args.workdirs, args.out, args.smooth)
    except ValueError as error:
        print(f"training.plot: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
