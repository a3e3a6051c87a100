"""Probes of "Birth of a Transformer" (Bietti et al. 2023) logged during training, and their plots.

During training (`train.probes = "attention"`, see `configs/birth_transformer.py`) every evaluation
runs `probe_metrics` on a fixed batch of the bigram task and adds to the "val" record of
`metrics.jsonl`:

  probe/loss_in_context        mean loss at repeated triggers, whose output is copied from context
  probe/loss_global_bigram     mean loss where the next token follows the global bigram
  probe/layer{l}_head{h}_previous_token   attention to the previous token from the positions
                                          right after a trigger (1.0 = all of it)
  probe/layer{l}_head{h}_induction        attention from a repeated trigger to the tokens that
                                          followed its earlier occurrences (1.0 = all of it)
  probe/layer{l}_head{h}_memory_recall    Transformer only: fraction of tokens k for which the
                                          head's output-value matrix W_O W_V, read through the
                                          output embeddings, maps e_k to k

and writes the attention maps of the first sequence to `attention_maps/step_NNNNNN.npz` in the
workdir (one array `layer{l}` of shape (heads, t, t) per layer).

For Mamba the attention maps are implicit: `experiments.implicit_attention` on the dt, A, B and C
of each mixer. A "head" there is the whole layer: the magnitudes |alpha| of every channel are
normalized to rows summing to 1 and averaged over the channels.

Plot the probes of one or more runs:

    python -m experiments.birth --workdirs=runs/birth_transformer,runs/birth_mamba \\
        --output_dir=runs/results/birth
"""

import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from experiments.implicit_attention import implicit_attention
from experiments.probes import (
    associative_memory_recall,
    induction_score,
    previous_token_score,
    split_loss,
)
from training import outputs
from training.metrics import read_metrics

ATTENTION_MAP_DIR = "attention_maps"
# The probe batch: sequences of the bigram task from a stream that no training or validation
# batch uses (training.tasks.VALIDATION_STREAM + 1).
PROBE_STREAM = (1 << 20) + 1
PROBE_BATCH_SIZE = 16
# Sequences of the probe batch whose attention maps are computed. Mamba's implicit attention
# materializes (b, e, n, t, t) float32 decays, about 0.5 GB for 4 sequences of 128 tokens at
# e = 128, n = 16.
MAP_BATCH_SIZE = 4


def is_transformer(model: nnx.Module) -> bool:
    return hasattr(model.blocks[0], "attention")


def mamba_implicit_attention(model: nnx.Module, tokens_bt: jax.Array) -> list[jax.Array]:
    """Return per layer the implicit attention alpha (b, e, t, t) of each Mamba mixer.

    Runs the same embedding, norms and mixer steps as `model(tokens_bt)` and captures dt, A, B
    and C before each selective scan.
    """
    x_btd = model._embed(tokens_bt)
    maps = []
    for block in model.blocks:
        _, dt_bte, A_en, B_btn, C_btn = block.mixer.scan_inputs(block.norm(x_btd))
        maps.append(implicit_attention(dt_bte, A_en, B_btn, C_btn))
        x_btd = block(x_btd)
    return maps


def attention_maps(model: nnx.Module, tokens_bt: jax.Array) -> list[np.ndarray]:
    """Return per layer attention weights (b, heads, t, t) with rows summing to 1.

    Transformer: the softmax weights of each head. Mamba: one head per layer, the channel mean
    of the row-normalized magnitudes of the implicit attention.
    """
    if is_transformer(model):
        from attention.transformer import attention_weights
        return [np.asarray(weights) for weights in attention_weights(model, tokens_bt)]
    maps = []
    for alpha_bets in mamba_implicit_attention(model, tokens_bt):
        magnitude = jnp.abs(alpha_bets)
        rows = magnitude / jnp.maximum(magnitude.sum(axis=-1, keepdims=True), 1e-30)
        maps.append(np.asarray(rows.mean(axis=1, keepdims=True)))
    return maps


def head_memory_recall(model: nnx.Module, layer: int, vocab_size: int) -> list[float]:
    """Return per head of a Transformer layer the recall of k -> k in W_O W_V (see the module doc).

    Input embeddings are the token embeddings times the layer's attention-norm scale; output
    embeddings are the unembedding rows times the final-norm scale.
    """
    block = model.blocks[layer]
    config = block.attention.config
    if config.num_kv_heads != config.num_heads:
        raise ValueError("head_memory_recall needs one key/value head per query head, got "
                         f"num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads}")
    head_dim = config.head_dim
    table_vd = np.asarray(model.embedding.embedding[...])[:vocab_size]
    if model.head is None:
        unembedding_vd = table_vd
    else:
        unembedding_vd = np.asarray(model.head.kernel[...]).T[:vocab_size]
    inputs_vd = table_vd * np.asarray(block.attention_norm.scale[...])
    outputs_vd = unembedding_vd * np.asarray(model.final_norm.scale[...])
    value_kernel = np.asarray(block.attention.value_proj.kernel[...])
    out_kernel = np.asarray(block.attention.out_proj.kernel[...])
    pairs = np.stack([np.arange(vocab_size)] * 2, axis=1)

    recalls = []
    for head in range(config.num_heads):
        channels = slice(head * head_dim, (head + 1) * head_dim)
        matrix = (value_kernel[:, channels] @ out_kernel[channels, :]).T
        recalls.append(associative_memory_recall(matrix, inputs_vd, outputs_vd, pairs))
    return recalls


def probe_batch(source) -> dict[str, np.ndarray]:
    """Return the fixed probe batch of a `training.tasks.TaskData` source."""
    return source.generate(source.config.train.seed, 0, PROBE_STREAM, PROBE_BATCH_SIZE)


def probe_metrics(model: nnx.Module, source, step: int, workdir: str | os.PathLike,
                  is_writer: bool) -> dict[str, float]:
    """Compute the probes of the module docstring; save the attention maps when `is_writer`."""
    batch = probe_batch(source)
    tokens_bt = jnp.asarray(batch["inputs"])
    logits_btv = model(tokens_bt).astype(jnp.float32)
    losses_bt = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv, jnp.asarray(batch["targets"]))
    losses = split_loss(losses_bt, batch["in_context_mask"], batch["global_bigram_mask"])
    metrics = {"probe/loss_in_context": float(losses["in_context"]),
               "probe/loss_global_bigram": float(losses["global_bigram"])}

    maps = attention_maps(model, tokens_bt[:MAP_BATCH_SIZE])
    # As in Bietti et al., the previous-token score counts the positions right after a trigger,
    # where the induction mechanism needs it: there the first layer writes the trigger into the
    # output token's position, which the second layer's head later finds.
    after_trigger_bt = np.zeros_like(batch["global_bigram_mask"][:MAP_BATCH_SIZE])
    after_trigger_bt[:, 1:] = ~batch["global_bigram_mask"][:MAP_BATCH_SIZE, :-1]
    for layer, weights_bhts in enumerate(maps):
        previous = previous_token_score(weights_bhts, query_mask_bt=after_trigger_bt)
        induction = induction_score(weights_bhts, batch["inputs"][:MAP_BATCH_SIZE],
                                    query_mask_bt=batch["in_context_mask"][:MAP_BATCH_SIZE])
        for head in range(weights_bhts.shape[1]):
            prefix = f"probe/layer{layer}_head{head}"
            metrics[f"{prefix}_previous_token"] = float(previous[head])
            metrics[f"{prefix}_induction"] = float(induction[head])
    if is_transformer(model):
        vocab_size = source.config.model.vocab_size
        for layer in range(len(model.blocks)):
            for head, recall in enumerate(head_memory_recall(model, layer, vocab_size)):
                metrics[f"probe/layer{layer}_head{head}_memory_recall"] = recall

    if is_writer:
        folder = Path(workdir) / ATTENTION_MAP_DIR
        folder.mkdir(exist_ok=True)
        np.savez_compressed(folder / f"step_{step:06d}.npz", tokens=batch["inputs"][0],
                            **{f"layer{layer}": weights[0] for layer, weights in enumerate(maps)})
    return metrics


# ---- plots


def read_probe_records(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """Return the "val" records of a run that contain probes, in step order (last record per step).

    Raises ValueError for a missing or unreadable metrics.jsonl and for a run without probes.
    """
    records = [record for record in read_metrics(workdir, "val")
               if "probe/loss_in_context" in record]
    if not records:
        raise ValueError(f"no probe records in {str(workdir)!r}/metrics.jsonl; train with "
                         "train.probes='attention'")
    return records


def probe_series(records: list[dict[str, float]], kind: str) -> dict[str, np.ndarray]:
    """Return {"layer L head H": values over the records} for probes named ..._{kind}."""
    pattern = re.compile(rf"probe/layer(\d+)_head(\d+)_{kind}$")
    series = {}
    for name in records[0]:
        match = pattern.match(name)
        if match:
            label = f"layer {match.group(1)} head {match.group(2)}"
            series[label] = np.array([record[name] for record in records])
    return series


def transition_step(steps: np.ndarray, values: np.ndarray, fraction: float = 0.5,
                    min_change: float = 0.0) -> int | None:
    """Return the first step at which `values` has covered `fraction` of its fall to the minimum.

    The fall starts at the highest value before the minimum, so a loss that first rises (the
    in-context loss while the model learns the global bigram) is measured from its peak. Returns
    None when the fall is not larger than `min_change` (noise on a flat curve).
    """
    lowest = int(np.argmin(values))
    peak = int(np.argmax(values[:lowest + 1]))
    drop = values[peak] - values[lowest]
    if drop <= min_change:
        return None
    threshold = values[peak] - fraction * drop
    reached = peak + np.nonzero(values[peak:] <= threshold)[0]
    return int(steps[reached[0]])


# Smallest changes that `summarize_run` reports as a transition: 0.1 nats of loss, and 0.1 of an
# attention score (a uniform head over 128 positions scores about 0.03).
MIN_LOSS_CHANGE = 0.1
MIN_SCORE_CHANGE = 0.1


def summarize_run(workdir: str | os.PathLike) -> dict[str, object]:
    """Return the steps at which each loss has fallen half way, and the best induction head."""
    records = read_probe_records(workdir)
    steps = np.array([record["step"] for record in records])
    in_context = np.array([record["probe/loss_in_context"] for record in records])
    global_bigram = np.array([record["probe/loss_global_bigram"] for record in records])
    induction = probe_series(records, "induction")
    best_head = max(induction, key=lambda label: induction[label][-1])
    return {
        "workdir": str(workdir),
        "global_bigram_half_drop_step": transition_step(steps, global_bigram,
                                                        min_change=MIN_LOSS_CHANGE),
        "in_context_half_drop_step": transition_step(steps, in_context,
                                                     min_change=MIN_LOSS_CHANGE),
        "final_loss_global_bigram": float(global_bigram[-1]),
        "final_loss_in_context": float(in_context[-1]),
        "best_induction_head": best_head,
        "best_induction_head_half_rise_step": transition_step(
            steps, -induction[best_head], min_change=MIN_SCORE_CHANGE),
        "final_induction_score": float(induction[best_head][-1]),
    }


def plot_run(workdir: str | os.PathLike, output_path: Path, map_steps: list[int]) -> None:
    """Plot losses, previous-token, induction and memory-recall probes and attention maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_probe_records(workdir)
    steps = np.array([record["step"] for record in records])
    kinds = [kind for kind in ("previous_token", "induction", "memory_recall")
             if probe_series(records, kind)]
    map_files = _chosen_map_files(workdir, map_steps)
    first_maps = np.load(map_files[0][1]) if map_files else None
    num_layers = 0 if first_maps is None else sum(name.startswith("layer")
                                                  for name in first_maps.files)

    columns = max(1 + len(kinds), len(map_files))
    rows = 1 + num_layers
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows),
                                squeeze=False)
    axis = axes[0, 0]
    axis.plot(steps, [record["probe/loss_global_bigram"] for record in records],
              label="global bigram")
    axis.plot(steps, [record["probe/loss_in_context"] for record in records], label="in-context")
    axis.set(title="loss by position type", xlabel="step", ylabel="loss (nats)")
    axis.legend()
    for column, kind in enumerate(kinds, start=1):
        axis = axes[0, column]
        for label, values in probe_series(records, kind).items():
            axis.plot(steps, values, label=label)
        axis.set(title=kind.replace("_", " ") + " score", xlabel="step", ylim=(-0.02, 1.02))
        axis.legend(fontsize=7)
    for column in range(1 + len(kinds), columns):
        axes[0, column].axis("off")

    for column, (step, path) in enumerate(map_files):
        maps = np.load(path)
        for layer in range(num_layers):
            weights_hts = maps[f"layer{layer}"]
            axis = axes[1 + layer, column]
            # Heads side by side (at most 4), each (t, t).
            shown = np.concatenate(list(weights_hts[:4]), axis=1)
            axis.imshow(shown, cmap="viridis", vmin=0.0, vmax=max(float(shown.max()), 1e-6))
            axis.set(title=f"step {step}, layer {layer}", xlabel="key position (heads side "
                     "by side)", ylabel="query position")
    for row in range(1, rows):
        for column in range(len(map_files), columns):
            axes[row, column].axis("off")

    figure.suptitle(str(workdir))
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)


def plot_comparison(workdirs: list[str], output_path: Path) -> None:
    """Plot the last saved attention maps of several runs side by side, one column per run.

    Rows are layers; a Transformer layer shows its heads side by side, a Mamba layer its one
    implicit-attention map. Every run shows the same probe sequence, so the maps line up.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_maps = []
    for workdir in workdirs:
        files = _chosen_map_files(workdir, [])
        if not files:
            raise ValueError(f"no attention maps under {str(workdir)!r}/{ATTENTION_MAP_DIR}")
        last_maps.append(files[-1])
    num_layers = max(sum(name.startswith("layer") for name in np.load(path).files)
                     for _, path in last_maps)
    figure, axes = plt.subplots(num_layers, len(workdirs),
                                figsize=(4.2 * len(workdirs), 3.6 * num_layers), squeeze=False)
    for column, (workdir, (step, path)) in enumerate(zip(workdirs, last_maps, strict=True)):
        maps = np.load(path)
        for layer in range(num_layers):
            axis = axes[layer, column]
            if f"layer{layer}" not in maps.files:
                axis.axis("off")
                continue
            shown = np.concatenate(list(maps[f"layer{layer}"][:4]), axis=1)
            axis.imshow(shown, cmap="viridis", vmin=0.0, vmax=max(float(shown.max()), 1e-6))
            axis.set(title=f"{Path(workdir).name}, step {step}, layer {layer}",
                     xlabel="key position", ylabel="query position")
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)


def saved_map_files(workdir: str | os.PathLike) -> dict[int, Path]:
    """Return {step: path} of the attention maps saved in a run, in step order."""
    files = sorted((Path(workdir) / ATTENTION_MAP_DIR).glob("step_*.npz"))
    return {int(path.stem.split("_")[1]): path for path in files}


def _chosen_map_files(workdir, map_steps: list[int]) -> list[tuple[int, Path]]:
    available = saved_map_files(workdir)
    if not available:
        return []
    if not map_steps:
        ordered = sorted(available)
        picks = [ordered[0], ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3],
                 ordered[-1]]
        map_steps = sorted(set(picks))
    # The saved step nearest to each requested one.
    chosen = []
    for step in map_steps:
        nearest = min(available, key=lambda saved: abs(saved - step))
        if nearest not in [saved for saved, _ in chosen]:
            chosen.append((nearest, available[nearest]))
    return chosen



def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define the command-line flags (only when run as a script, so that importing defines none)."""
    flags.DEFINE_list("workdirs", None, "Training workdirs with probe records.",
                      flag_values=flag_values)
    flags.DEFINE_string("output_dir", "runs/results/birth",
                        "Folder for the plots and summary.json; created if missing.",
                        flag_values=flag_values)
    flags.DEFINE_list("map_steps", [], "Training steps whose attention maps to plot, each a step "
                      "with saved maps in every run; default: four spread over each run.",
                      flag_values=flag_values)


def check_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[int]:
    """Return the map steps, after checking every flag and run and creating --output_dir.

    Raises app.UsageError naming the flag, before any plot or summary is written.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        map_steps = [int(step) for step in flag_values.map_steps]
    except ValueError:
        raise app.UsageError(f"--map_steps must be a comma-separated list of integers, got "
                             f"{','.join(flag_values.map_steps)}") from None
    workdirs = flag_values.workdirs
    if not workdirs:
        raise app.UsageError("--workdirs is empty; pass training workdirs with probe records, "
                             "separated by commas")
    for workdir in workdirs:
        check_run(workdir, map_steps, needs_maps=len(workdirs) > 1)
    names = {}
    for workdir in workdirs:
        name = Path(workdir).name
        if name in names:
            raise app.UsageError(f"--workdirs {names[name]!r} and {workdir!r} have the same "
                                 f"folder name {name!r}, so their plots {name}.png would "
                                 "overwrite each other; copy or link one of them to another name")
        names[name] = workdir
    try:
        outputs.prepare_output_dir(flag_values.output_dir, "output_dir")
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    return map_steps


def check_run(workdir: str, map_steps: list[int], *, needs_maps: bool) -> None:
    """Raise app.UsageError unless `workdir` has the probes that the plots and summary read.

    `needs_maps`: the run needs saved attention maps (the side-by-side plot of several runs).
    """
    if not Path(workdir).is_dir():
        raise app.UsageError(f"--workdirs: {workdir!r} not found or not a folder")
    try:
        records = read_probe_records(workdir)
    except ValueError as error:
        raise app.UsageError(f"--workdirs: {error}") from None
    if "probe/loss_global_bigram" not in records[0] or not probe_series(records, "induction"):
        raise app.UsageError(f"--workdirs: the probe records of {workdir!r} have no "
                             "probe/loss_global_bigram or no probe/layer*_head*_induction; train "
                             "with train.probes='attention'")
    saved = saved_map_files(workdir)
    if not saved and (needs_maps or map_steps):
        needed_by = "--map_steps" if map_steps else "the side-by-side plot of several runs"
        raise app.UsageError(f"--workdirs: {workdir!r} has no attention maps under "
                             f"{Path(workdir) / ATTENTION_MAP_DIR}, which {needed_by} needs; "
                             "train with train.probes='attention'")
    missing = [step for step in map_steps if step not in saved]
    if missing:
        raise app.UsageError(f"--map_steps: {workdir!r} has no attention maps of step(s) "
                             f"{', '.join(map(str, missing))}; its saved steps: "
                             f"{', '.join(map(str, saved))}")


def main(argv: list[str]) -> None:
    try:
        map_steps = check_flags(flags.FLAGS, argv)
    except app.UsageError as error:  # One line, without absl's usage text.
        sys.exit(f"experiments.birth: error: {error}")
    output_dir = Path(flags.FLAGS.output_dir)
    summaries = []
    for workdir in flags.FLAGS.workdirs:
        name = Path(workdir).name
        plot_run(workdir, output_dir / f"{name}.png", map_steps)
        summary = summarize_run(workdir)
        summaries.append(summary)
        logging.info("%s: %s", name, summary)
    if len(flags.FLAGS.workdirs) > 1:
        plot_comparison(flags.FLAGS.workdirs, output_dir / "attention_maps_side_by_side.png")
    (output_dir / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    logging.info("wrote plots and summary.json to %s", output_dir)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdirs"])
    app.run(main)
