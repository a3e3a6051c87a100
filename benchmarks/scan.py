"""Time the three selective scan implementations, forward and forward+backward, over lengths.

    python -m benchmarks.scan                      # defaults: under 10 minutes on a 2-core CPU
    python -m benchmarks.scan --lengths=256,1024,4096,16384,65536 --batch=8 --d_inner=1536

For each mode and length it reports the median time and the minimum bytes the computation must
move: each input read once and each output written once, in float32. The bandwidth that this
implies is given as a fraction of a copy bandwidth measured in the same run. The associative scan also materialises
(b, t, e, n) tensors, so its real traffic is larger than this minimum; `state_mib` shows that size.
"""

import functools
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from ssm import SCAN_MODES, selective_scan
from training import host_memory

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help
FLOAT32_BYTES = 4


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("lengths", ["256", "1024", "4096", "16384"], "Sequence lengths t.",
                      flag_values=flag_values)
    flags.DEFINE_list("modes", list(SCAN_MODES), f"Scan modes, from {SCAN_MODES}.",
                      flag_values=flag_values)
    flags.DEFINE_integer("batch", 1, "Batch size b.", flag_values=flag_values)
    flags.DEFINE_integer("d_inner", 256, "Expanded channels e (expand * d_model).",
                         flag_values=flag_values)
    flags.DEFINE_integer("d_state", 16, "State size n.", flag_values=flag_values)
    flags.DEFINE_integer("chunk_size", 256, "Time steps per chunk of the chunked scan.",
                         flag_values=flag_values)
    flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the median is reported.",
                         flag_values=flag_values)
    flags.DEFINE_string("out", "benchmarks/results/scan",
                        "Folder for scan.json, scan.csv, scan.png; created if missing.",
                        flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[int]:
    """Return the lengths, and create the --out folder; raise ValueError on an invalid flag."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    lengths = common.parse_ints(flag_values.lengths, "lengths")
    if not flag_values.modes:
        raise ValueError(f"--modes is empty; allowed: {', '.join(SCAN_MODES)}")
    unknown = [mode for mode in flag_values.modes if mode not in SCAN_MODES]
    if unknown:
        raise ValueError(f"--modes has unknown modes {', '.join(unknown)}; allowed: "
                         f"{', '.join(SCAN_MODES)}")
    common.check_at_least_one(flag_values, ["batch", "d_inner", "d_state", "chunk_size",
                                            "repeats"])
    common.prepare_output_dir(flag_values.out)
    return lengths


def scan_inputs(batch: int, length: int, d_inner: int, d_state: int):
    """Random scan inputs with Mamba's ranges: dt in (0.001, 0.1), A negative."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (batch, length, d_inner))
    dt = jax.random.uniform(keys[1], (batch, length, d_inner), minval=0.001, maxval=0.1)
    A = -jnp.exp(jax.random.normal(keys[2], (d_inner, d_state)))
    B = jax.random.normal(keys[3], (batch, length, d_state))
    C = jax.random.normal(keys[4], (batch, length, d_state))
    return x, dt, A, B, C


def minimum_bytes(batch: int, length: int, d_inner: int, d_state: int, *, backward: bool) -> int:
    """Bytes read and written by a scan that touches each input and output once.

    Forward reads x, dt (b, t, e), B, C (b, t, n), A (e, n) and writes y (b, t, e). The backward
    pass reads the inputs and dy again and writes dx, ddt, dB, dC and dA.
    """
    bte = batch * length * d_inner
    btn = batch * length * d_state
    en = d_inner * d_state
    forward = 3 * bte + 2 * btn + en
    if not backward:
        return FLOAT32_BYTES * forward
    backward_reads = 3 * bte + 2 * btn + en
    backward_writes = 2 * bte + 2 * btn + en
    return FLOAT32_BYTES * (forward + backward_reads + backward_writes)


def build_functions(mode: str, chunk_size: int):
    """Return jitted forward and forward+backward functions of the scan in `mode`."""
    scan = functools.partial(selective_scan, mode=mode, chunk_size=chunk_size)

    @jax.jit
    def forward(x, dt, A, B, C):
        return scan(x, dt, A, B, C)[0]

    @jax.jit
    def forward_backward(x, dt, A, B, C, dy):
        def weighted_output(x, dt, A, B, C):
            return jnp.sum(scan(x, dt, A, B, C)[0] * dy)

        return jax.grad(weighted_output, argnums=(0, 1, 2, 3, 4))(x, dt, A, B, C)

    return forward, forward_backward


def run(lengths, modes, *, batch, d_inner, d_state, chunk_size, repeats):
    """Measure every (mode, length, pass) and return the rows and the copy bandwidth."""
    bandwidth = common.copy_bandwidth()
    rows = []
    for length in lengths:
        x, dt, A, B, C = scan_inputs(batch, length, d_inner, d_state)
        dy = jnp.ones_like(x)
        for mode in modes:
            forward, forward_backward = build_functions(mode, chunk_size)
            passes = {
                "forward": lambda: forward(x, dt, A, B, C),
                "forward+backward": lambda: forward_backward(x, dt, A, B, C, dy),
            }
            for name, call in passes.items():
                seconds = common.median_seconds(call, repeats=repeats)
                num_bytes = minimum_bytes(batch, length, d_inner, d_state,
                                          backward=name != "forward")
                rows.append({
                    "mode": mode,
                    "pass": name,
                    "length": length,
                    "ms": 1e3 * seconds,
                    "min_mib": num_bytes / 2**20,
                    "gb_per_s": num_bytes / seconds / 1e9,
                    "fraction_of_copy": num_bytes / seconds / bandwidth,
                    "state_mib": FLOAT32_BYTES * batch * length * d_inner * d_state / 2**20,
                })
                print(f"{mode:12s} {name:17s} t={length:6d} {1e3 * seconds:9.2f} ms", flush=True)
    return rows, bandwidth


def plot(rows, out_dir):
    figure, axes = common.plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, name in zip(axes, ("forward", "forward+backward"), strict=True):
        for mode in dict.fromkeys(row["mode"] for row in rows):
            selected = [r for r in rows if r["mode"] == mode and r["pass"] == name]
            axis.loglog([r["length"] for r in selected], [r["ms"] for r in selected], "o-",
                        label=mode)
        axis.set_title(f"selective scan, {name}")
        axis.set_xlabel("sequence length t")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    return common.save_figure(figure, out_dir, "scan")


def main(argv):
    host_memory.apply_flag()  # before JAX starts its backend
    try:
        lengths = check_flags(FLAGS, argv)
    except ValueError as error:
        sys.exit(f"benchmarks.scan: error: {error}")
    info = common.machine()

    rows, bandwidth = run(lengths, FLAGS.modes, batch=FLAGS.batch, d_inner=FLAGS.d_inner,
                          d_state=FLAGS.d_state, chunk_size=FLAGS.chunk_size,
                          repeats=FLAGS.repeats)

    summary = {"copy_bandwidth_gb_per_s": bandwidth / 1e9, "batch": FLAGS.batch,
               "d_inner": FLAGS.d_inner, "d_state": FLAGS.d_state,
               "chunk_size": FLAGS.chunk_size, "repeats": FLAGS.repeats}
    common.write_results(FLAGS.out, "scan", rows, summary, info)
    plot(rows, FLAGS.out)
    print(f"\nMachine: {common.describe_machine(info)}")
    print(f"Copy bandwidth (x + 1 on 256 MiB float32): {bandwidth / 1e9:.2f} GB/s; "
          f"b={FLAGS.batch}, e={FLAGS.d_inner}, n={FLAGS.d_state}, chunk {FLAGS.chunk_size}\n")
    print(common.markdown_table(rows, ["mode", "pass", "length", "ms", "min_mib", "gb_per_s",
                                       "fraction_of_copy", "state_mib"]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
