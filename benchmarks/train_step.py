"""Training-step time, memory and model FLOPs utilisation against sequence length.

    python -m benchmarks.train_step               # defaults: a few minutes on a 2-core CPU
    python -m benchmarks.train_step --lengths=512,2048,8192,32768 --tokens_per_batch=262144 \\
        --d_model=768 --num_layers=24

Every length runs at the same number of tokens per batch (batch = tokens / length), so a model
whose cost per token does not depend on the length shows flat times. The step is
`training.train_step` (forward, backward, AdamW) under `jax.jit`. Memory is XLA's estimate for the
compiled step (arguments, outputs and temporaries), available on every backend.

Model FLOPs per token are 6 * N, where N counts all parameters because the tied embedding is
also the output head. The Transformer adds 12 * layers * t * d_model per token for its attention
scores, with no causal halving. MFU divides them by the step time and by a float32 matrix-multiply peak measured in the
same run.
"""

import sys

import jax
import numpy as np
import optax
from absl import app, flags

from benchmarks import common, model_configs
from models.registry import count_parameters
from ssm import SCAN_MODES
from training import create_train_state, host_memory, train_step

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Sequence lengths t.",
                      flag_values=flag_values)
    flags.DEFINE_integer("tokens_per_batch", 4096, "Tokens per batch, a multiple of every "
                         "length; batch = tokens / length.", flag_values=flag_values)
    flags.DEFINE_integer("d_model", 256, "Model width of both models.", flag_values=flag_values)
    flags.DEFINE_integer("num_layers", 4, "Mamba layers; the Transformer's count is matched.",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_heads", 4, "Transformer attention heads; must divide --d_model "
                         "into heads of an even size.", flag_values=flag_values)
    flags.DEFINE_enum("scan", "sequential", SCAN_MODES,
                      "Mamba's selective scan (sequential: the fastest forward+backward on CPU).",
                      flag_values=flag_values)
    flags.DEFINE_integer("repeats", 3, "Timed steps per measurement; the median is reported.",
                         flag_values=flag_values)
    flags.DEFINE_string("out", "benchmarks/results/train_step",
                        "Folder for train_step.json/.csv/.png; created if missing.",
                        flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[int]:
    """Return the lengths, and create the --out folder; raise ValueError on an invalid flag."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    lengths = common.parse_ints(flag_values.lengths, "lengths")
    common.check_at_least_one(flag_values, ["tokens_per_batch", "d_model", "num_layers",
                                            "num_heads", "repeats"])
    uneven = [length for length in lengths if flag_values.tokens_per_batch % length]
    if uneven:
        raise ValueError(f"--tokens_per_batch={flag_values.tokens_per_batch} must be a multiple "
                         f"of every length; it is not of {', '.join(map(str, uneven))}")
    common.check_num_heads(flag_values.d_model, flag_values.num_heads)
    common.prepare_output_dir(flag_values.out)
    return lengths


def model_flops_per_token(config, length: int) -> float:
    """Forward+backward FLOPs per token: 6 N, plus attention scores for the Transformer."""
    flops = 6.0 * count_parameters(config)
    if config["architecture"] == "transformer":
        flops += 12.0 * config["num_layers"] * length * config["d_model"]
    return flops


def xla_flops(compiled) -> float | None:
    """Return XLA's FLOP count of a compiled function, or None where the backend gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # Older JAX versions return one dict per computation.
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def measure(config, length: int, batch_size: int, repeats: int) -> dict:
    """Time `repeats` training steps of `config` on random tokens; return one result row."""
    learning_rate = optax.constant_schedule(1e-4)
    state = create_train_state(model_configs.build(config), optax.adamw(learning_rate),
                               learning_rate)
    tokens = np.random.default_rng(0).integers(0, 256, (1, batch_size, length + 1), np.int32)
    step = jax.jit(train_step, donate_argnums=0)
    compiled = step.lower(state, tokens).compile()

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], tokens)
        return metrics["loss"]

    seconds = common.median_seconds(one_step, repeats=repeats)
    model_flops = model_flops_per_token(config, length) * batch_size * length
    compiled_flops = xla_flops(compiled)
    memory = common.compiled_memory_bytes(compiled)
    return {
        "model": config["architecture"],
        "length": length,
        "batch": batch_size,
        "ms": 1e3 * seconds,
        "tokens_per_s": batch_size * length / seconds,
        "memory_mib": None if memory is None else memory / 2**20,
        "model_tflop": model_flops / 1e12,
        "xla_tflop": None if compiled_flops is None else compiled_flops / 1e12,
        "model_gflop_per_s": model_flops / seconds / 1e9,
    }


def plot(rows, out_dir):
    figure, (speed, memory) = common.plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        selected = [r for r in rows if r["model"] == model]
        lengths = [r["length"] for r in selected]
        speed.semilogx(lengths, [r["ms"] for r in selected], "o-", label=model)
        memory.semilogx(lengths, [r["memory_mib"] or 0 for r in selected], "o-", label=model)
    speed.set_ylabel("median step time (ms)")
    memory.set_ylabel("compiled step memory (MiB)")
    lengths = sorted({r["length"] for r in rows})
    for axis in (speed, memory):
        axis.set_xlabel("sequence length (fixed tokens per batch)")
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
        axis.set_ylim(bottom=0)
    speed.legend()
    return common.save_figure(figure, out_dir, "train_step")


def main(argv):
    host_memory.apply_flag()  # before JAX starts its backend
    try:
        lengths = check_flags(FLAGS, argv)
        mamba = model_configs.mamba_config(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                                           scan=FLAGS.scan)
        configs = [mamba, model_configs.matched_transformer_config(mamba,
                                                                    num_heads=FLAGS.num_heads)]
    except ValueError as error:
        sys.exit(f"benchmarks.train_step: error: {error}")
    info = common.machine()
    peak = common.matmul_peak()

    rows = []
    for config in configs:
        for length in lengths:
            row = measure(config, length, FLAGS.tokens_per_batch // length, FLAGS.repeats)
            row["mfu"] = row["model_gflop_per_s"] * 1e9 / peak
            rows.append(row)
            print(f"{row['model']:12s} t={length:6d} {row['ms']:9.1f} ms", flush=True)

    summary = {"matmul_peak_gflop_per_s": peak / 1e9, "scan": FLAGS.scan,
               "tokens_per_batch": FLAGS.tokens_per_batch,
               "models": [model_configs.describe(c) for c in configs]}
    common.write_results(FLAGS.out, "train_step", rows, summary, info)
    plot(rows, FLAGS.out)
    print(f"\nMachine: {common.describe_machine(info)}")
    print("\n".join(summary["models"]))
    print(f"float32 matmul peak (2048 x 2048): {peak / 1e9:.1f} GFLOP/s; "
          f"Mamba scan: {FLAGS.scan}\n")
    print(common.markdown_table(rows, ["model", "length", "batch", "ms", "tokens_per_s",
                                       "memory_mib", "model_tflop", "xla_tflop", "mfu"]))


if __name__ == "__main__":
    define_flags()
    app.run(main)
