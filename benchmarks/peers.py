"""Our Mamba training step against two PyTorch implementations of the same model, on the CPU.

Needs the optional `peers` extra, which pulls PyTorch; install it into a separate environment:

    python3 -m venv /tmp/venv-peers && /tmp/venv-peers/bin/pip install -e '.[peers]'
    /tmp/venv-peers/bin/python -m benchmarks.peers    # defaults: about 3 minutes on 2 CPU cores

All three run the same shapes, by default d_model 256, 4 layers, d_state 16, expand 2, batch 4,
length 512 and float32. They do the same work: the language-model forward, the mean next-token
cross entropy and the backward pass to every parameter, with no optimizer update.

- ours: `models.registry.build_model` Mamba under `jax.jit`, its loss (`sequence_loss`) and
  gradients from `training.steps.data_parallel_loss_and_grads`, as `train.py` computes them
  with replicated parameters.
- transformers: `MambaForCausalLM` with `use_mambapy=False`, which without the CUDA kernels is
  its eager PyTorch path (a Python loop over time steps).
- mambapy: `mambapy.mamba.Mamba` with `pscan=True` (parallel scan), between an embedding and a
  tied head of ours.

Results are tokens per second and the ratio of ours to each. By default each implementation is
timed in a fresh Python process (`--isolate`), so that none runs after another's compiled code and
freed memory. A fresh process that runs longer than `--child_timeout` seconds (default 1800) is
stopped, and the benchmark exits with an error that names it.
"""

import json
import os
import signal
import subprocess
import sys
import time

# Only local code is used; this keeps Hugging Face libraries from trying the network for kernels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from benchmarks import common, model_configs  # noqa: E402
from data.tokenizer import VOCAB_SIZE  # noqa: E402
from ssm import SCAN_MODES  # noqa: E402
from training import host_memory  # noqa: E402
from training.sharding import DATA_AXIS, data_mesh  # noqa: E402
from training.steps import (create_train_state, data_parallel_loss_and_grads,  # noqa: E402
                            sequence_loss)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(host_memory)  # --keep_host_memory appears in --help
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("length", 512, "Sequence length in tokens.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("num_layers", 4, "Mamba layers.")
flags.DEFINE_integer("d_state", 16, "SSM state size.")
flags.DEFINE_integer("expand", 2, "Expansion factor.")
flags.DEFINE_list("scans", list(SCAN_MODES), "Our selective scan implementations to time.")
flags.DEFINE_integer("repeats", 10, "Timed steps of ours; the median is reported.")
flags.DEFINE_integer("mambapy_repeats", 5, "Timed steps of mambapy.")
flags.DEFINE_integer("transformers_repeats", 1,
                     "Timed steps of transformers (each about 40 s on a 2-core CPU).")
flags.DEFINE_string("out", "benchmarks/results/peers", "Folder for peers.json/.csv/.png.")
flags.DEFINE_bool("isolate", True,
                  "Time each implementation in a fresh Python process with the same sizes, "
                  "repeats and --keep_host_memory.")
flags.DEFINE_float("child_timeout", 1800,
                   "Seconds that each fresh process of --isolate may run before it is stopped and "
                   "the benchmark exits with an error; 0 for no limit.")
flags.DEFINE_string("implementation", None,
                    "Used by --isolate: time only this implementation ('ours:SCAN', 'mambapy' or "
                    "'transformers') and print its result as one line of JSON, with no files "
                    "written (--out, --scans and --isolate are then ignored).")

MAX_CHILD_TIMEOUT = 2_147_483  # seconds, about 24.8 days

# The flags that a fresh process for one implementation gets from the command that starts it.
PASSED_FLAGS = ("batch", "length", "d_model", "num_layers", "d_state", "expand", "repeats",
                "mambapy_repeats", "transformers_repeats", "keep_host_memory")


def time_ours(tokens: np.ndarray, scan: str) -> tuple[float, int]:
    """Return the median seconds of our forward+backward and the parameter count."""
    config = model_configs.mamba_config(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                                        d_state=FLAGS.d_state, expand=FLAGS.expand, scan=scan)
    # train.py's state and loss; no optimizer update is timed, so none is set up.
    state = create_train_state(model_configs.build(config), optax.identity(),
                               optax.constant_schedule(0.0))
    params, context = state.params, state.replace(opt_state=None)

    # With several devices (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N), the
    # batch is split over them and the parameters replicated, as `train.py` does.
    mesh = data_mesh()

    @jax.jit
    def loss_and_grads(params, context, tokens_bt):
        # One micro-batch: (1, b, t + 1).
        return data_parallel_loss_and_grads(sequence_loss, params, context, tokens_bt[None],
                                            mesh)

    tokens = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
    params, context = jax.device_put((params, context), NamedSharding(mesh, PartitionSpec()))
    seconds = common.median_seconds(lambda: loss_and_grads(params, context, tokens),
                                    repeats=FLAGS.repeats)
    return seconds, sum(leaf.size for leaf in jax.tree.leaves(params))


def build_transformers_model():
    import transformers

    config = transformers.MambaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=FLAGS.d_model, num_hidden_layers=FLAGS.num_layers,
        state_size=FLAGS.d_state, expand=FLAGS.expand, conv_kernel=4, use_mambapy=False)
    return transformers.MambaForCausalLM(config)


def build_mambapy_model():
    """Return mambapy's Mamba blocks inside an embedding, final RMSNorm and tied head.

    The wrapper is ours: `mambapy.lm.LM` imports its Mamba-2 module, which needs `einops`, a
    package that mambapy 1.2 does not declare.
    """
    import torch
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm

    config = MambaConfig(d_model=FLAGS.d_model, n_layers=FLAGS.num_layers, d_state=FLAGS.d_state,
                         expand_factor=FLAGS.expand, d_conv=4, pscan=True)

    class MambapyLanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB_SIZE, FLAGS.d_model)
            self.mamba = Mamba(config)
            self.norm = RMSNorm(FLAGS.d_model)

        def forward(self, tokens_bt):
            x_btd = self.norm(self.mamba(self.embedding(tokens_bt)))
            return x_btd @ self.embedding.weight.T

    return MambapyLanguageModel()


def time_torch(model, tokens: np.ndarray, repeats: int) -> tuple[float, int]:
    """Return the median seconds of a PyTorch forward+backward and the parameter count."""
    import torch
    import torch.nn.functional as F

    model.train()
    tokens = torch.from_numpy(tokens.astype(np.int64))

    def step(tokens_bt):
        model.zero_grad(set_to_none=True)
        output = model(tokens_bt[:, :-1])
        logits = output.logits if hasattr(output, "logits") else output
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               tokens_bt[:, 1:].reshape(-1))
        loss.backward()

    step(tokens[:, :17])  # One short step first, so one-time set-up is not timed.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), sum(p.numel() for p in model.parameters())


def measure(implementation: str, tokens: np.ndarray) -> dict:
    """Return the result row of one implementation: its name, median seconds and parameters."""
    if implementation.startswith("ours:"):
        scan = implementation.removeprefix("ours:")
        seconds, num_params = time_ours(tokens, scan)
        devices = f", {jax.device_count()} devices" if jax.device_count() > 1 else ""
        name = f"ours ({scan} scan{devices})"
    else:
        import torch

        torch.manual_seed(0)
        name, build, repeats = {
            "mambapy": ("mambapy (pscan)", build_mambapy_model, FLAGS.mambapy_repeats),
            "transformers": ("transformers (eager)", build_transformers_model,
                             FLAGS.transformers_repeats),
        }[implementation]
        seconds, num_params = time_torch(build(), tokens, repeats)
    return {"implementation": name, "seconds": seconds, "parameters": num_params}


def measure_in_fresh_process(implementation: str) -> dict:
    """Return `measure(implementation)` run by a new Python process with this one's sizes,
    repeats and --keep_host_memory (`PASSED_FLAGS`); exit with an error if it fails or runs
    longer than --child_timeout."""
    command = [sys.executable, "-m", "benchmarks.peers", f"--implementation={implementation}"]
    command += [f"--{name}={FLAGS[name].value}" for name in PASSED_FLAGS]
    # The child runs on this process's backend, so it does not probe for others (TPU, GPU).
    environment = dict(os.environ, JAX_PLATFORMS=jax.default_backend())
    # The child's log lines (such as the warning that the C++ kernel is missing) pass through.
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment,
                                check=False, timeout=FLAGS.child_timeout or None)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child
        sys.exit(f"benchmarks.peers: error: timing {implementation} in a fresh process timed "
                 f"out after {FLAGS.child_timeout:g} seconds (--child_timeout), and the process "
                 f"was stopped; raise --child_timeout, or pass --child_timeout=0 for no limit")
    if result.returncode != 0:
        sys.exit(f"benchmarks.peers: error: timing {implementation} in a fresh process failed "
                 f"with exit status {result.returncode}; its messages are above")
    lines = result.stdout.strip().splitlines()
    if not lines:
        sys.exit(f"benchmarks.peers: error: the fresh process timing {implementation} printed "
                 f"no result")
    return json.loads(lines[-1])


def _exit_on_sigterm(signum, frame):
    """Raise SystemExit, so that `subprocess.run` stops the child it waits for."""
    del frame
    raise SystemExit(128 + signum)


def main(argv):
    host_memory.apply_flag()  # before JAX starts its backend
    del argv
    try:
        common.check_at_least_one(FLAGS, ["batch", "length", "d_model", "num_layers", "d_state",
                                          "expand", "repeats", "mambapy_repeats",
                                          "transformers_repeats"])
    except ValueError as error:
        sys.exit(f"benchmarks.peers: error: {error}")
    # subprocess.run's wait takes at most 2**31 - 1 milliseconds (Python 3.11 on Linux).
    if not 0 <= FLAGS.child_timeout <= MAX_CHILD_TIMEOUT:
        sys.exit(f"benchmarks.peers: error: --child_timeout={FLAGS.child_timeout:g} is invalid; "
                 f"allowed: 0 (no limit) or seconds up to {MAX_CHILD_TIMEOUT:,}")
    unknown = [s for s in FLAGS.scans if s not in SCAN_MODES]
    if unknown:
        sys.exit(f"benchmarks.peers: error: --scans has unknown modes {', '.join(unknown)}; "
                 f"allowed: {', '.join(SCAN_MODES)}")
    torch_implementations = ["mambapy", "transformers"]
    allowed = [f"ours:{scan}" for scan in SCAN_MODES] + torch_implementations
    if FLAGS.implementation is not None and FLAGS.implementation not in allowed:
        sys.exit(f"benchmarks.peers: error: unknown --implementation={FLAGS.implementation}; "
                 f"allowed: {', '.join(allowed)}")
    # A fresh process that times one of our scans needs no PyTorch.
    if FLAGS.implementation is None or FLAGS.implementation in torch_implementations:
        try:
            import torch
        except ImportError:
            sys.exit("benchmarks.peers: error: PyTorch is not installed in this environment; "
                     "install the `peers` extra into a separate one: python3 -m venv "
                     "/tmp/venv-peers && /tmp/venv-peers/bin/pip install -e '.[peers]'")
    if FLAGS.batch < 1 or FLAGS.batch % jax.device_count():
        sys.exit(f"benchmarks.peers: error: --batch={FLAGS.batch} must be a positive multiple of "
                 f"the {jax.device_count()} devices the batch is split over")

    tokens = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.length + 1), np.int32)
    if FLAGS.implementation is not None:
        print(json.dumps(measure(FLAGS.implementation, tokens)))
        return

    info = common.machine()
    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["isolated_processes"] = FLAGS.isolate
    num_tokens = FLAGS.batch * FLAGS.length

    if FLAGS.isolate:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rows = []
    for implementation in [f"ours:{scan}" for scan in FLAGS.scans] + torch_implementations:
        if FLAGS.isolate:
            row = measure_in_fresh_process(implementation)
        else:
            row = measure(implementation, tokens)
        rows.append(row)
        print(f"{row['implementation']}: {row['seconds']:.3f} s", flush=True)

    best_ours = min((r for r in rows if r["implementation"].startswith("ours")),
                    key=lambda r: r["seconds"])
    for row in rows:
        row["tokens_per_s"] = num_tokens / row["seconds"]
        row["best_ours_speedup"] = row["seconds"] / best_ours["seconds"]
    summary = {"best_ours": best_ours["implementation"], "batch": FLAGS.batch,
               "length": FLAGS.length, "d_model": FLAGS.d_model, "num_layers": FLAGS.num_layers,
               "d_state": FLAGS.d_state, "expand": FLAGS.expand}
    common.write_results(FLAGS.out, "peers", rows, summary, info)

    figure, axis = common.plt.subplots(figsize=(7, 3.5))
    axis.barh([r["implementation"] for r in rows], [r["tokens_per_s"] for r in rows])
    axis.set_xscale("log")
    axis.set_xlabel("training tokens / s (forward + backward)")
    axis.grid(True, axis="x", which="both", alpha=0.3)
    common.save_figure(figure, FLAGS.out, "peers")

    print(f"\nMachine: {common.describe_machine(info)}; torch {torch.__version__} with "
          f"{info['torch_threads']} threads")
    print(f"batch {FLAGS.batch} x length {FLAGS.length}, d_model {FLAGS.d_model}, "
          f"{FLAGS.num_layers} layers, d_state {FLAGS.d_state}, expand {FLAGS.expand}, float32\n")
    print(common.markdown_table(rows, ["implementation", "parameters", "seconds", "tokens_per_s",
                                       "best_ours_speedup"]))


if __name__ == "__main__":
    app.run(main)
