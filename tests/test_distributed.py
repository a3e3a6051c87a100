"""Tests of multi-process training on one machine: processes on 127.0.0.1, forced CPU devices.

Every run is a fresh `train.py` (or short script) process with
XLA_FLAGS=--xla_force_host_platform_device_count=N, joined through JAX's distributed runtime on
a loopback port chosen free at run time. The learning rate is constant (no warmup, no decay), so
that a run of 2 steps continued to 4 is the same computation as a run of 4 steps.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from training import config as config_lib
from training.metrics import read_metrics
from flax import nnx

from models.registry import build_model
from training.sharding import leaf_partition_spec, logical_axis_names, mesh_shape

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/transformer_lm.py:tiny"
# Seconds one run (all its processes) may take on 2 shared CPU cores before the test fails.
RUN_TIMEOUT_S = 150
CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n\n",
    "for index in range(10):\n    print(index)\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
]

FSDP_SCRIPT = """
import json, sys
from training import config as config_lib, train_and_evaluate
from training.sharding import leaf_path
import jax
config = config_lib.load_config_file(sys.argv[1])
for override in sys.argv[4:]:
    dotted, value = override.split("=", 1)
    config_lib.set_field(config, dotted, json.loads(value))
state = train_and_evaluate(config, sys.argv[2])
shards = {}
for tree_name, tree in (("params", state.params), ("opt_state", state.opt_state)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shards[tree_name + "/" + leaf_path(path)] = {
            "shape": list(leaf.shape),
            "device_shapes": [list(shard.data.shape) for shard in leaf.addressable_shards]}
with open(sys.argv[3], "w") as file:
    json.dump(shards, file)
"""


# Every named dimension but the model width goes to the fsdp axis.
LOGICAL_RULES = [["vocab", "fsdp"], ["mlp", "fsdp"], ["heads", "fsdp"], ["embed", None]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_flags(corpus: Path, workdir: Path, num_steps: int) -> list[str]:
    return [f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.path={corpus}",
            "--config.data.val_fraction=0.1", f"--config.train.num_steps={num_steps}",
            "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
            "--config.optimizer.warmup_steps=0",
            "--config.optimizer.final_learning_rate_fraction=1.0"]


def start(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def start_processes(args: list[str], num_processes: int, devices: int,
                    timeout_s: int = 60) -> list[subprocess.Popen]:
    """Start `num_processes` copies of `train.py args` that join on a free loopback port."""
    if num_processes == 1:
        return [start(["train.py", *args], devices)]
    coordinator = f"127.0.0.1:{free_port()}"
    return [start(["train.py", *args, f"--coordinator_address={coordinator}",
                   f"--num_processes={num_processes}", f"--process_id={index}",
                   f"--initialization_timeout={timeout_s}"], devices)
            for index in range(num_processes)]


def wait_all(processes: list[subprocess.Popen], timeout_s: float = RUN_TIMEOUT_S
             ) -> list[tuple[int, str]]:
    """Return (exit status, output) of each process; kill them all when the time is up."""
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def train_losses(workdir: Path, split: str = "train") -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(workdir, split)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    rng = np.random.default_rng(0)
    path.write_text("".join(CORPUS_LINES[i] for i in rng.integers(0, len(CORPUS_LINES), 600)))
    return path


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Run, in parallel where independent, the workdirs that the tests below compare:

      reference   1 process x 4 devices, replicated, 4 steps
      two         2 processes x 2 devices, replicated, 2 steps (checkpoint at step 2)
      fsdp        1 process x 4 devices, mesh.fsdp=4 with LOGICAL_RULES, 4 steps (writes
                  shards.json)
      resumed     a copy of `two` continued to step 4 by 1 process x 2 devices
    """
    root = tmp_path_factory.mktemp("runs")
    workdirs = {name: root / name for name in ("reference", "two", "fsdp", "resumed")}
    fsdp_overrides = ["data.path=" + json.dumps(str(corpus)), "data.val_fraction=0.1",
                      "train.num_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                      "optimizer.warmup_steps=0", "optimizer.final_learning_rate_fraction=1.0",
                      "mesh.fsdp=4", "mesh.logical_rules=" + json.dumps(LOGICAL_RULES)]

    processes = {
        "reference": start_processes(run_flags(corpus, workdirs["reference"], 4), 1, 4),
        "two": start_processes(run_flags(corpus, workdirs["two"], 2), 2, 2),
        "fsdp": [start(["-c", FSDP_SCRIPT, CONFIG, str(workdirs["fsdp"]),
                        str(root / "shards.json"), *fsdp_overrides], 4)],
    }
    for name, group in processes.items():
        for returncode, output in wait_all(group):
            assert returncode == 0, f"{name} run failed:\n{output}"

    shutil.copytree(workdirs["two"], workdirs["resumed"])
    [(returncode, output)] = wait_all(
        start_processes(run_flags(corpus, workdirs["resumed"], 4), 1, 2))
    assert returncode == 0, f"resumed run failed:\n{output}"
    assert "resumed from the checkpoint of step 2" in output
    return {**workdirs, "shards": root / "shards.json"}


# ---- the acceptance runs


def test_two_processes_match_one_process_losses(runs):
    reference, two = train_losses(runs["reference"]), train_losses(runs["two"])
    assert sorted(two) == [1, 2]
    np.testing.assert_allclose([two[1], two[2]], [reference[1], reference[2]], rtol=0, atol=1e-5)

    reference_val, two_val = train_losses(runs["reference"], "val"), train_losses(runs["two"],
                                                                                  "val")
    np.testing.assert_allclose(two_val[2], reference_val[2], rtol=0, atol=1e-5)


def test_only_process_zero_writes_metrics(runs):
    with open(runs["two"] / "metrics.jsonl") as lines:
        records = [json.loads(line) for line in lines]
    # Two processes appending would give each (step, split) twice.
    keys = [(record["step"], record["split"]) for record in records]
    assert keys == [(1, "train"), (2, "train"), (2, "val")]


def test_two_process_checkpoint_resumes_in_one_process(runs):
    reference, resumed = train_losses(runs["reference"]), train_losses(runs["resumed"])
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [reference[3], reference[4]], rtol=0,
                               atol=1e-5)
    reference_val, resumed_val = (train_losses(runs["reference"], "val"),
                                  train_losses(runs["resumed"], "val"))
    np.testing.assert_allclose(resumed_val[4], reference_val[4], rtol=0, atol=1e-5)


def test_fsdp_matches_replicated_losses(runs):
    reference, fsdp = train_losses(runs["reference"]), train_losses(runs["fsdp"])
    assert sorted(fsdp) == [1, 2, 3, 4]
    np.testing.assert_allclose([fsdp[step] for step in range(1, 5)],
                               [reference[step] for step in range(1, 5)], rtol=0, atol=1e-5)


def test_fsdp_devices_hold_quarter_of_matrices(runs):
    shards = json.loads(runs["shards"].read_text())
    matrices = {path: leaf for path, leaf in shards.items() if len(leaf["shape"]) >= 2}
    assert any(path.startswith("params/") for path in matrices)
    assert any("/mu/" in path for path in matrices)  # the Adam moments are sharded too
    for path, leaf in matrices.items():
        assert len(leaf["device_shapes"]) == 4, path
        for device_shape in leaf["device_shapes"]:
            assert np.prod(device_shape) * 4 == np.prod(leaf["shape"]), (path, device_shape)
    vectors = [leaf for leaf in shards.values() if len(leaf["shape"]) == 1]
    assert vectors
    for leaf in vectors:
        assert all(shape == leaf["shape"] for shape in leaf["device_shapes"])


def test_mamba_fsdp_matches_replicated_losses(corpus, tmp_path):
    # The runs above train the Transformer. Mamba's matrices split along its expanded width.
    overrides = ["data.path=" + json.dumps(str(corpus)), "data.val_fraction=0.1",
                 "train.num_steps=3", "train.eval_every=3", "train.checkpoint_every=3",
                 "optimizer.warmup_steps=0"]
    fsdp_overrides = ["mesh.fsdp=4", "mesh.logical_rules=" + json.dumps(LOGICAL_RULES)]
    runs = {name: tmp_path / name for name in ("replicated", "fsdp")}
    processes = [start(["-c", FSDP_SCRIPT, "configs/mamba_lm.py:tiny", str(runs[name]),
                        str(tmp_path / f"{name}.json"), *overrides,
                        *(fsdp_overrides if name == "fsdp" else [])], 4)
                 for name in runs]
    for returncode, output in wait_all(processes):
        assert returncode == 0, output

    replicated, fsdp = train_losses(runs["replicated"]), train_losses(runs["fsdp"])
    assert sorted(fsdp) == [1, 2, 3]
    np.testing.assert_allclose([fsdp[step] for step in range(1, 4)],
                               [replicated[step] for step in range(1, 4)], rtol=0, atol=1e-5)
    shards = json.loads((tmp_path / "fsdp.json").read_text())
    in_proj = shards["params/blocks/0/mixer/in_proj/kernel"]
    assert [np.prod(shape) * 4 for shape in in_proj["device_shapes"]] == [
        np.prod(in_proj["shape"])] * 4


@pytest.mark.slow
def test_fsdp_across_processes_matches_replicated(runs, corpus, tmp_path):
    # The fsdp axis of size 4 spans both processes, so parameters are gathered across them.
    workdir = tmp_path / "fsdp_two"
    processes = start_processes([*run_flags(corpus, workdir, 4), "--config.mesh.fsdp=4"], 2, 2)
    for returncode, output in wait_all(processes):
        assert returncode == 0, output
        assert "Traceback" not in output, output

    reference, fsdp = train_losses(runs["reference"]), train_losses(workdir)
    assert sorted(fsdp) == [1, 2, 3, 4]
    np.testing.assert_allclose([fsdp[step] for step in range(1, 5)],
                               [reference[step] for step in range(1, 5)], rtol=0, atol=1e-5)


MESH_SCRIPT = """
import json, sys
from training import config as config_lib
from training.sharding import build_mesh
config = config_lib.load_config_file(sys.argv[1])
config_lib.set_field(config, "mesh.fsdp", 2)
mesh = build_mesh(config)
print(json.dumps({"axes": list(mesh.axis_names),
                  "ids": [[device.id for device in row] for row in mesh.devices]}))
"""


def test_fsdp_groups_are_consecutive_devices():
    # 4 devices as (data 2, fsdp 2): fsdp is the inner axis, so devices 0 and 1 split one copy
    # of the parameters between them, and devices 2 and 3 split the other copy.
    [(returncode, output)] = wait_all([start(["-c", MESH_SCRIPT, CONFIG], 4)])
    assert returncode == 0, output

    mesh = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    assert mesh["axes"] == ["data", "fsdp"]
    assert mesh["ids"] == [[0, 1], [2, 3]]


# ---- sharding rules


def test_rule_splits_largest_divisible_dimension():
    mesh = _FakeMesh({"data": 1, "fsdp": 4})
    rules = [("embedding", "fsdp")]
    assert leaf_partition_spec("params/embedding", (264, 32), rules, mesh) == PartitionSpec(
        "fsdp", None)
    # 258 is not a multiple of 4, so the smaller dimension is split.
    assert leaf_partition_spec("params/embedding", (258, 32), rules, mesh) == PartitionSpec(
        None, "fsdp")
    assert leaf_partition_spec("params/embedding", (258, 30), rules, mesh) == PartitionSpec()
    assert leaf_partition_spec("params/norm/scale", (32,), rules, mesh) == PartitionSpec()
    assert leaf_partition_spec("params/head/kernel", (32, 264), rules, mesh) == PartitionSpec()


def test_first_matching_rule_wins():
    mesh = _FakeMesh({"data": 2, "fsdp": 2})
    rules = [("embedding", None), (".*", "fsdp")]
    assert leaf_partition_spec("params/embedding", (264, 32), rules, mesh) == PartitionSpec()
    assert leaf_partition_spec("opt_state/0/mu/blocks/0/kernel", (32, 8), rules,
                               mesh) == PartitionSpec("fsdp", None)


def test_logical_rules_split_named_dimensions():
    mesh = _FakeMesh({"data": 1, "fsdp": 4})
    logical = [tuple(rule) for rule in LOGICAL_RULES]
    regex = [(".*", "fsdp")]
    cases = [
        ("params/blocks/0/mixer/in_proj/kernel", (32, 128), PartitionSpec(None, "fsdp")),
        ("opt_state/1/0/mu/blocks/0/mixer/out_proj/kernel", (64, 32), PartitionSpec("fsdp", None)),
        ("params/embedding/embedding", (264, 32), PartitionSpec("fsdp", None)),
        ("params/blocks/0/attention/out_proj/kernel", (32, 32), PartitionSpec("fsdp", None)),
        # 258 vocabulary rows do not divide over 4 devices, and "embed" maps to None.
        ("params/embedding/embedding", (258, 32), PartitionSpec(None, None)),
    ]
    for path, shape, expected in cases:
        assert leaf_partition_spec(path, shape, regex, mesh, logical) == expected, path


def test_logical_rules_fall_back_to_path_rules():
    mesh = _FakeMesh({"data": 1, "fsdp": 4})
    logical = [("mlp", "fsdp")]
    # No logical names for this path, so the path rule decides.
    assert leaf_partition_spec("params/extra/kernel", (8, 32), [("extra", "fsdp")], mesh,
                               logical) == PartitionSpec(None, "fsdp")


@pytest.mark.parametrize("config_name", ["configs/mamba_lm.py:tiny",
                                         "configs/transformer_lm.py:tiny"])
def test_every_model_matrix_has_logical_names(config_name):
    config = config_lib.load_config_file(config_name)
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))

    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        name = "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
        if len(leaf.shape) >= 2:
            assert logical_axis_names(name, len(leaf.shape)) is not None, name


def test_logical_rule_with_unknown_name_lists_allowed():
    config = tiny_config(**{"mesh.logical_rules": (("hidden", "fsdp"),)})
    with pytest.raises(ValueError,
                       match=r"mesh.logical_rules\[0\].*unknown logical axis 'hidden'.*vocab"):
        config_lib.validate_config(config, num_devices=4)
    config = tiny_config(**{"mesh.logical_rules": (("mlp", "model"),)})
    with pytest.raises(ValueError, match=r"mesh.logical_rules\[0\].*unknown mesh axis 'model'"):
        config_lib.validate_config(config, num_devices=4)


class _FakeMesh:
    """The part of `jax.sharding.Mesh` that `leaf_partition_spec` reads: axis sizes."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape


# ---- bad input


def tiny_config(**overrides):
    config = config_lib.load_config_file(CONFIG)
    for dotted, value in overrides.items():
        config_lib.set_field(config, dotted, value)
    return config


def test_rule_with_unknown_mesh_axis_names_allowed_axes():
    config = tiny_config(**{"mesh.rules": (("kernel", "model"),)})
    with pytest.raises(ValueError,
                       match=r"mesh.rules\[0\].*unknown mesh axis 'model'.*data, fsdp"):
        config_lib.validate_config(config, num_devices=4)


def test_mesh_that_does_not_fit_devices_names_fields():
    with pytest.raises(ValueError, match=r"mesh.fsdp=3.*number of devices \(4\)"):
        mesh_shape(tiny_config(**{"mesh.fsdp": 3}), 4)
    with pytest.raises(ValueError, match=r"mesh.data=2, mesh.fsdp=1.*\(4\)"):
        mesh_shape(tiny_config(**{"mesh.data": 2}), 4)
    assert mesh_shape(tiny_config(**{"mesh.fsdp": 2}), 4) == {"data": 2, "fsdp": 2}


def test_batch_not_divisible_over_data_axis():
    config = tiny_config(**{"data.batch_size": 6})
    with pytest.raises(ValueError, match=r"data.batch_size=6.*devices \(4\)"):
        config_lib.validate_config(config, num_devices=4)


def test_bad_process_flags_exit_with_one_message(corpus, tmp_path):
    cases = [
        (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1234"],
         "invalid --process_id=2 for --num_processes=2; allowed: 0 to 1"),
        (["--num_processes=2"], "missing --coordinator_address, --process_id"),
        (["--num_processes=2", "--process_id=0", "--coordinator_address=localhost"],
         "invalid --coordinator_address='localhost'"),
        (["--config.mesh.fsdp=3"], "mesh.fsdp=3"),
    ]
    processes = [start(["train.py", *run_flags(corpus, tmp_path / "run", 2), *flags], 2)
                 for flags, _ in cases]
    for (flags, message), (returncode, output) in zip(cases, wait_all(processes)):
        assert returncode != 0, flags
        assert message in output, output
        assert "Traceback" not in output, output


def test_missing_processes_time_out_with_message(corpus, tmp_path):
    # Process 1 of 2 finds no coordinator listening on its port, and process 0 of 2 waits for a
    # partner that never starts. Both wait the bounded time, then exit with a message.
    port = free_port()
    flags = run_flags(corpus, tmp_path / "run", 2)
    processes = [
        start(["train.py", *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               "--process_id=1", "--initialization_timeout=3"], 2),
        start(["train.py", *flags, f"--coordinator_address=127.0.0.1:{free_port()}",
               "--num_processes=2", "--process_id=0", "--initialization_timeout=3"], 2),
    ]
    started = time.monotonic()
    for returncode, output in wait_all(processes, timeout_s=90):
        assert returncode == 1, output
        assert "timed out after 3 s joining the distributed runtime" in output, output
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()
