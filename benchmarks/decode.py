"""Decode throughput and cache memory against context length: Mamba against a Transformer.

    python -m benchmarks.decode                   # defaults: under 10 minutes on a 2-core CPU
    python -m benchmarks.decode --contexts=256,4096,65536,262144 --batch_sizes=1,64 \\
        --d_model=768 --num_layers=24 --new_tokens=256

For each model, batch size and context length L, a random prompt of L tokens is prefilled in
chunks (not timed), then `generation.decode_loop` samples `--new_tokens` tokens, compiled, with
the cache copied before each timed repeat. The Transformer is Transformer++ of Mamba's width with
the layer count that best matches Mamba's parameter count. Its key/value cache has L +
`--new_tokens` positions; Mamba's cache has a fixed size.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common, model_configs
from generation import SamplingConfig, decode_loop
from ssm import SCAN_MODES
from training import host_memory

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("contexts", ["256", "1024", "4096", "16384"], "Context lengths L in tokens.",
                      flag_values=flag_values)
    flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes.", flag_values=flag_values)
    flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per timed call.",
                         flag_values=flag_values)
    flags.DEFINE_integer("prefill_chunk", 1024, "Prompt tokens per prefill call (bounds memory).",
                         flag_values=flag_values)
    flags.DEFINE_integer("d_model", 256, "Model width of both models.", flag_values=flag_values)
    flags.DEFINE_integer("num_layers", 4, "Mamba layers; the Transformer's count is matched.",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_heads", 4, "Transformer attention heads; must divide --d_model "
                         "into heads of an even size.", flag_values=flag_values)
    flags.DEFINE_enum("scan", "sequential", SCAN_MODES,
                      "Mamba's selective scan in the (untimed) prefill; decoding steps do not "
                      "scan.", flag_values=flag_values)
    flags.DEFINE_integer("repeats", 3, "Timed calls per measurement; the median is reported.",
                         flag_values=flag_values)
    flags.DEFINE_string("out", "benchmarks/results/decode",
                        "Folder for decode.json/.csv/.png; created if missing.",
                        flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> tuple[list[int], list[int]]:
    """Return the contexts and batch sizes, and create the --out folder; raise ValueError on an
    invalid flag.
    """
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    contexts = common.parse_ints(flag_values.contexts, "contexts")
    batch_sizes = common.parse_ints(flag_values.batch_sizes, "batch_sizes")
    common.check_at_least_one(flag_values, ["new_tokens", "prefill_chunk", "d_model",
                                            "num_layers", "num_heads", "repeats"])
    common.check_num_heads(flag_values.d_model, flag_values.num_heads)
    common.prepare_output_dir(flag_values.out)
    return contexts, batch_sizes


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "max_len"))
def empty_cache(graphdef, state, *, batch_size, max_len):
    return nnx.merge(graphdef, state).init_cache(batch_size, max_len)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, tokens_bt, cache):
    """Continue `cache` with a chunk of tokens; return the last position's logits and the cache."""
    logits_btv, cache = nnx.merge(graphdef, state).prefill(tokens_bt, cache)
    return logits_btv[:, -1], cache


def prefilled_cache(graphdef, state, *, batch_size, context, max_len, chunk):
    """Prefill a random prompt of `context` tokens; return the last logits and the cache."""
    tokens = np.random.default_rng(0).integers(0, 256, (batch_size, context), dtype=np.int32)
    cache = empty_cache(graphdef, state, batch_size=batch_size, max_len=max_len)
    for start in range(0, context, chunk):
        logits, cache = prefill_chunk(graphdef, state, jnp.asarray(tokens[:, start:start + chunk]),
                                      cache)
    return logits, cache


def time_decode(graphdef, state, logits, cache, *, new_tokens, repeats, sampling):
    """Return the median seconds of one decode call; the donated cache is copied outside timing."""
    def call(cache_copy):
        return decode_loop(graphdef, state, logits, cache_copy, jax.random.key(0), sampling,
                           max_new_tokens=new_tokens, stop_token=None, pad_token=0)

    jax.block_until_ready(call(jax.tree.map(jnp.copy, cache)))  # Compile.
    times = []
    for _ in range(repeats):
        cache_copy = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
        start = time.perf_counter()
        jax.block_until_ready(call(cache_copy))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(configs, contexts, batch_sizes, *, new_tokens, chunk, repeats):
    rows = []
    for name, config in configs.items():
        graphdef, state = nnx.split(model_configs.build(config))
        sampling = SamplingConfig(temperature=1.0).as_arrays(config["vocab_size"])
        for batch_size in batch_sizes:
            for context in contexts:
                logits, cache = prefilled_cache(
                    graphdef, state, batch_size=batch_size, context=context,
                    max_len=context + new_tokens, chunk=min(chunk, context))
                seconds = time_decode(graphdef, state, logits, cache, new_tokens=new_tokens,
                                      repeats=repeats, sampling=sampling)
                rows.append({
                    "model": name,
                    "batch": batch_size,
                    "context": context,
                    "ms_per_step": 1e3 * seconds / new_tokens,
                    "tokens_per_s": batch_size * new_tokens / seconds,
                    "cache_mib": common.tree_bytes(cache) / 2**20,
                })
                del cache
                print(f"{name:12s} b={batch_size:3d} L={context:7d} "
                      f"{rows[-1]['ms_per_step']:8.2f} ms/step", flush=True)
    return rows


def summarize(rows, contexts, batch_sizes):
    """Return the ratios behind the targets, measured in this run."""
    def lookup(model, batch, context):
        return next(r for r in rows if (r["model"], r["batch"], r["context"]) == (model, batch,
                                                                                   context))

    shortest, longest = min(contexts), max(contexts)
    summary = {}
    for batch in batch_sizes:
        mamba_short, mamba_long = lookup("mamba", batch, shortest), lookup("mamba", batch, longest)
        transformer_long = lookup("transformer", batch, longest)
        summary[f"b{batch}_mamba_step_time_ratio_{longest}_vs_{shortest}"] = (
            mamba_long["ms_per_step"] / mamba_short["ms_per_step"])
        summary[f"b{batch}_mamba_over_transformer_throughput_at_{longest}"] = (
            mamba_long["tokens_per_s"] / transformer_long["tokens_per_s"])
    return summary


def plot(rows, out_dir):
    figure, (speed, memory) = common.plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows):
            selected = [r for r in rows if r["model"] == model and r["batch"] == batch]
            contexts = [r["context"] for r in selected]
            style = "o-" if model == "mamba" else "s--"
            speed.loglog(contexts, [r["tokens_per_s"] for r in selected], style,
                         label=f"{model}, batch {batch}")
            memory.loglog(contexts, [r["cache_mib"] for r in selected], style,
                          label=f"{model}, batch {batch}")
    speed.set_ylabel("decode tokens / s")
    memory.set_ylabel("cache (MiB)")
    for axis in (speed, memory):
        axis.set_xlabel("context length (tokens)")
        axis.grid(True, which="both", alpha=0.3)
    speed.legend()
    return common.save_figure(figure, out_dir, "decode")


def main(argv):
    host_memory.apply_flag()  # before JAX starts its backend
    try:
        contexts, batch_sizes = check_flags(FLAGS, argv)
        mamba = model_configs.mamba_config(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                                           scan=FLAGS.scan)
        configs = {"mamba": mamba,
                   "transformer": model_configs.matched_transformer_config(
                       mamba, num_heads=FLAGS.num_heads)}
    except ValueError as error:
        sys.exit(f"benchmarks.decode: error: {error}")
    info = common.machine()

    rows = run(configs, contexts, batch_sizes, new_tokens=FLAGS.new_tokens,
               chunk=FLAGS.prefill_chunk, repeats=FLAGS.repeats)

    summary = summarize(rows, contexts, batch_sizes)
    summary["models"] = {name: model_configs.describe(c) for name, c in configs.items()}
    summary["new_tokens"] = FLAGS.new_tokens
    common.write_results(FLAGS.out, "decode", rows, summary, info)
    plot(rows, FLAGS.out)
    print(f"\nMachine: {common.describe_machine(info)}")
    for name, config in configs.items():
        print(f"{name}: {model_configs.describe(config)}")
    print(f"{FLAGS.new_tokens} tokens per timed call, median of {FLAGS.repeats}\n")
    print(common.markdown_table(rows, ["model", "batch", "context", "ms_per_step",
                                       "tokens_per_s", "cache_mib"]))
    print()
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"{key}: {value:.3g}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
