"""Metrics of a run: `metrics.jsonl` and TensorBoard event files in the workdir, progress lines.

Only process 0 writes; on other processes the writer drops every record.

Each line of `metrics.jsonl` is one JSON object with `step` and `split`:

  split "train": loss (nats per token), bits_per_byte (text runs only), learning_rate,
                 grad_norm (global L2 norm before clipping), param_norm (global L2 norm after
                 the update), tokens (step times this run's batch_size * seq_len, so a run
                 resumed with other data sizes counts its earlier steps at the new size),
                 elapsed_s (wall time of this process since it started the run)
  split "val":   loss and, over the fixed validation set, bits_per_byte (text runs) or
                 accuracy at the scored positions (synthetic tasks), plus any probe values

A resumed run appends to the same file. Steps after the last checkpoint of a run that crashed
appear twice; readers keep the last record of each (step, split).
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def drop_cut_last_line(path: Path) -> None:
    """Remove a last line without its newline, which a run killed while writing leaves behind.

    Appending after it would glue the next record onto the cut one, in the middle of the file.
    """
    if not path.is_file():
        return
    with open(path, "rb+") as file:
        data = file.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        file.truncate(keep)
    logging.warning("dropped a cut last line of %d bytes from %s", len(data) - keep, path)


class MetricsWriter:
    """Append metric records to `metrics.jsonl` and TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool):
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        if enabled:
            path = Path(workdir) / METRICS_FILE
            drop_cut_last_line(path)
            self._file = open(path, "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()
            self._file = None


def read_metrics(workdir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Return the records of `split` in step order, keeping the last record of each step."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"no {METRICS_FILE} in {str(workdir)!r}; is it a training workdir?")
    by_step = {}
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not a JSON record ({error}); a run "
                                 "killed while writing leaves a cut last line: delete it") from None
            if record["split"] == split:
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, remainder = divmod(seconds, 3600)
    minutes, seconds = divmod(remainder, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def progress_line(step: int, num_steps: int, metrics: dict[str, float],
                  tokens_per_second: float | None, eta_seconds: float | None) -> str:
    """Format one progress line: step, loss, bits per byte (text runs), learning rate, gradient
    norm, throughput and the estimated time left.
    """
    speed = "compiling" if tokens_per_second is None else f"{tokens_per_second:,.0f} tokens/s"
    eta = "?" if eta_seconds is None else format_duration(eta_seconds)
    bits = f"{metrics['bits_per_byte']:.3f} bits/byte | " if "bits_per_byte" in metrics else ""
    return (f"step {step}/{num_steps} | loss {metrics['loss']:.4f} | {bits}"
            f"lr {metrics['learning_rate']:.2e} | grad norm {metrics['grad_norm']:.3f} | "
            f"{speed} | ETA {eta}")


class QuietLibraries(logging.Filter):
    """Drop INFO records of orbax and JAX (a dozen lines per checkpoint), keep warnings, and
    shorten their errors to one line each.

    A failed checkpoint save makes orbax log the same exception from four threads, with a
    traceback of about 40 lines each. The caller reports that error itself, so the library's
    records keep their message and the exception's first line, without the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/jaxlib/"))
        if noisy and record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {reason})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return record.levelno >= logging.WARNING or not noisy

