"""Helpers shared by the benchmark scripts: timing, reference peaks, memory, tables and plots.

Every script times medians over repeats after a compiling call, waits for results with
`block_until_ready`, and writes `<name>.json` (rows and machine), `<name>.csv` and `<name>.png` to
its `--out` folder.
"""

import csv
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

from training import host_memory, outputs

matplotlib.use("Agg")  # Files only; no display is needed.
import matplotlib.pyplot as plt  # noqa: E402

GIB = 2**30


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Call `fn` `warmup` times (to compile), then return the median seconds of `repeats` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = 256 * 2**20, *, repeats: int = 5) -> float:
    """Measure memory bandwidth in bytes/s: `y = x + 1` on a float32 array reads and writes it."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    add_one = jax.jit(lambda x: x + 1.0)
    seconds = median_seconds(lambda: add_one(x), repeats=repeats)
    return 2 * x.nbytes / seconds


def matmul_peak(size: int = 2048, *, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measure matrix-multiply throughput in FLOP/s on `size` x `size` matrices of `dtype`."""
    keys = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, b), repeats=repeats)
    return 2 * size**3 / seconds


def device_peak_bytes() -> int | None:
    """Return the accelerator's peak bytes in use since start, or None where not reported (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def max_rss_bytes() -> int:
    """Return this process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compiled_memory_bytes(compiled) -> int | None:
    """Return XLA's memory estimate of a compiled function: arguments + outputs + temporaries."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def tree_bytes(tree: Any) -> int:
    """Return the total size in bytes of the arrays in a pytree."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def machine() -> dict[str, Any]:
    """Describe the machine and its load at the time of the call."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "processor": platform.processor() or platform.machine(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host_memory_kept": host_memory.is_kept(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """Return a one-line description of `machine()`'s result, for the printed report."""
    return (f"{info['backend']} ({info['device_kind']}, {info['num_devices']} device(s)), "
            f"{info['cpu_count']} CPUs, 1-minute load average {info['load_average_1min']:.1f}, "
            f"jax {info['jax_version']}, keep_host_memory {info['host_memory_kept']}")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Format `rows` as a markdown table with the given columns; floats get 4 significant digits."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, name: str, rows: Sequence[dict[str, Any]],
                  summary: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write `name`.json (rows, summary, machine) and `name`.csv (rows) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump({"machine": info, "summary": summary, "rows": list(rows)}, f, indent=2)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out


def save_figure(figure, out_dir: str | os.PathLike, name: str) -> Path:
    """Save a matplotlib figure as `name`.png in `out_dir` and close it."""
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_ints(values: Sequence[str], flag: str) -> list[int]:
    """Parse a list flag of positive integers; raise ValueError naming the flag otherwise."""
    if not values:
        raise ValueError(f"--{flag} is empty; pass a comma-separated list of integers >= 1")
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--{flag} must be a comma-separated list of integers, got "
                         f"{','.join(values)}") from None
    if min(numbers) < 1:
        raise ValueError(f"--{flag} must list integers >= 1, got {','.join(values)}")
    return numbers


def check_at_least_one(flag_values, names: Sequence[str]) -> None:
    """Raise ValueError naming the first of the integer flags `names` whose value is below 1."""
    for name in names:
        value = getattr(flag_values, name)
        if value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value}")


def check_num_heads(d_model: int, num_heads: int) -> None:
    """Raise ValueError unless `num_heads` splits `d_model` into heads of an even size.

    The Transformer's rotary position embedding rotates channel pairs, so the head size must be
    even.
    """
    head_dim, remainder = divmod(d_model, num_heads)
    if remainder == 0 and head_dim % 2 == 0:
        return
    allowed = [heads for heads in range(1, d_model + 1)
               if d_model % heads == 0 and (d_model // heads) % 2 == 0]
    if not allowed:
        raise ValueError(f"--d_model={d_model} is odd, so no --num_heads gives heads of an even "
                         "size (rotary embeddings rotate channel pairs); pass an even --d_model")
    raise ValueError(f"--num_heads={num_heads} must divide --d_model={d_model} into heads of an "
                     "even size (rotary embeddings rotate channel pairs); allowed: "
                     f"{', '.join(str(heads) for heads in allowed)}")


def prepare_output_dir(path: str, flag: str = "out") -> Path:
    """Create the output folder `path` and check that it is writable, before measuring.

    Raises ValueError naming `--flag` (see `training.outputs`).
    """
    return outputs.prepare_output_dir(path, flag)
