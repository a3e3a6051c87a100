"""Mamba inference over 2^20 tokens: chunked prefill that carries the recurrent state.

    python -m benchmarks.long_context             # defaults: a few minutes on a 2-core CPU
    python -m benchmarks.long_context --total_tokens=16777216 --chunk=65536 --d_model=768 \\
        --num_layers=24

The sequence is scored chunk by chunk. Each call of `LanguageModel.prefill` continues from the
cache of the previous chunk and returns the summed next-token loss of its chunk. Only one chunk's
activations exist at a time, so memory does not grow with the sequence. The script reports time per
chunk (it must stay flat), tokens per second and peak memory: the process's peak resident memory
on CPU, the device's peak bytes in use on an accelerator.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from benchmarks import common, model_configs
from ssm import SCAN_MODES
from training import host_memory

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_integer("total_tokens", 2**20, "Tokens in the sequence.", flag_values=flag_values)
    flags.DEFINE_integer("chunk", 8192, "Tokens per prefill call; must divide --total_tokens.",
                         flag_values=flag_values)
    flags.DEFINE_integer("d_model", 256, "Mamba model width.", flag_values=flag_values)
    flags.DEFINE_integer("num_layers", 4, "Mamba layers.", flag_values=flag_values)
    flags.DEFINE_enum("scan", "sequential", SCAN_MODES, "Selective scan implementation "
                      "(sequential is the fastest on CPU in scan.py).", flag_values=flag_values)
    flags.DEFINE_string("out", "benchmarks/results/long_context",
                        "Folder for long_context.json/.csv/.png; created if missing.",
                        flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
    """Create the --out folder; raise ValueError on an invalid flag."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    common.check_at_least_one(flag_values, ["total_tokens", "chunk", "d_model", "num_layers"])
    if flag_values.total_tokens % flag_values.chunk:
        raise ValueError(f"--chunk={flag_values.chunk} must divide --total_tokens="
                         f"{flag_values.total_tokens}")
    common.prepare_output_dir(flag_values.out)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def score_chunk(graphdef, state, tokens_bt, next_token_b, cache):
    """Run one chunk from `cache`; return the summed loss in nats of its next tokens and the cache.

    `next_token_b` is the token after the chunk, so the chunk's last position is scored too.
    """
    logits_btv, cache = nnx.merge(graphdef, state).prefill(tokens_bt, cache)
    targets_bt = jnp.concatenate([tokens_bt[:, 1:], next_token_b[:, None]], axis=1)
    losses_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    return losses_bt.sum(), cache


def plot(rows, chunk: int, out_dir):
    figure, axis = common.plt.subplots(figsize=(6, 4))
    axis.plot([r["end_token"] for r in rows], [r["ms"] for r in rows], ".")
    axis.set_xlabel("tokens processed")
    axis.set_ylabel(f"ms per chunk of {chunk} tokens")
    axis.set_ylim(bottom=0)
    axis.set_title("Mamba chunked prefill with carried state")
    axis.grid(True, alpha=0.3)
    return common.save_figure(figure, out_dir, "long_context")


def main(argv):
    host_memory.apply_flag()  # before JAX starts its backend
    try:
        check_flags(FLAGS, argv)
    except ValueError as error:
        sys.exit(f"benchmarks.long_context: error: {error}")
    config = model_configs.mamba_config(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                                        scan=FLAGS.scan)
    info = common.machine()
    graphdef, state = nnx.split(model_configs.build(config))
    rss_before = common.max_rss_bytes()

    # Random bytes: the cost of the computation does not depend on the values.
    tokens = np.random.default_rng(0).integers(0, 256, (1, FLAGS.total_tokens + 1), np.int32)
    cache = nnx.merge(graphdef, state).init_cache(1, FLAGS.total_tokens)
    num_chunks = FLAGS.total_tokens // FLAGS.chunk
    rows = []
    total_loss = 0.0
    start_all = time.perf_counter()
    for index in range(num_chunks):
        begin = index * FLAGS.chunk
        chunk_tokens = jnp.asarray(tokens[:, begin:begin + FLAGS.chunk])
        next_token = jnp.asarray(tokens[:, begin + FLAGS.chunk])
        start = time.perf_counter()
        loss, cache = score_chunk(graphdef, state, chunk_tokens, next_token, cache)
        total_loss += float(loss)  # Waits for the chunk.
        rows.append({"chunk": index, "end_token": begin + FLAGS.chunk,
                     "ms": 1e3 * (time.perf_counter() - start)})
    total_seconds = time.perf_counter() - start_all

    # The first chunk includes compilation; the steady rate excludes it.
    steady_ms = float(np.median([r["ms"] for r in rows[1:]])) if num_chunks > 1 else rows[0]["ms"]
    summary = {
        "model": model_configs.describe(config),
        "scan": FLAGS.scan,
        "total_tokens": FLAGS.total_tokens,
        "chunk": FLAGS.chunk,
        "total_seconds_with_compilation": total_seconds,
        "median_chunk_ms": steady_ms,
        "tokens_per_s": FLAGS.chunk / (steady_ms / 1e3),
        "last_over_second_chunk_time": rows[-1]["ms"] / rows[min(1, num_chunks - 1)]["ms"],
        "peak_rss_gib": common.max_rss_bytes() / common.GIB,
        "rss_before_gib": rss_before / common.GIB,
        "device_peak_gib": (None if common.device_peak_bytes() is None
                            else common.device_peak_bytes() / common.GIB),
        "cache_bytes": common.tree_bytes(cache),
        "mean_loss_nats": total_loss / FLAGS.total_tokens,
    }
    common.write_results(FLAGS.out, "long_context", rows, summary, info)

    plot(rows, FLAGS.chunk, FLAGS.out)

    print(f"\nMachine: {common.describe_machine(info)}")
    print(common.markdown_table([{"quantity": k, "value": v} for k, v in summary.items()],
                                ["quantity", "value"]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
