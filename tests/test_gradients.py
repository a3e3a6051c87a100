"""Sums over devices in few all-reduces (training/gradients.py), and the data-parallel training
step that uses them, against `jax.lax.psum` per leaf and the step that `jax.jit` partitions.

Both run in a fresh process with 2 CPU devices, because the test process has one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PSUM_SCRIPT = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from training.gradients import psum_packed

mesh = Mesh(np.asarray(jax.devices()), ("data",))
shapes = {"scalar": (), "vector": (7,), "matrix": (3, 5), "large": (40, 30)}

def local(tree):
    # Each device's values differ, so a sum that drops or repeats a device is caught.
    index = jax.lax.axis_index("data")
    return jax.tree.map(lambda x: x * (index + 1) + index, tree)

rng = np.random.default_rng(0)
tree = {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()}
tree["half"] = jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)
tree["count"] = jnp.asarray(3, jnp.int32)
def compiled(sum_fn):
    return jax.jit(jax.shard_map(lambda tree: sum_fn(local(tree)), mesh=mesh, in_specs=P(),
                                 out_specs=P()))

def all_reduce_operands(fn):
    hlo = fn.lower(tree).compile().as_text()
    return [len(re.findall(r"\\[[0-9,]*\\]", line.split("all-reduce(")[0]))
            for line in hlo.splitlines() if " all-reduce(" in line]

# Compiled apart, so that XLA does not combine the two sums into one all-reduce.
packed_fn = compiled(lambda tree: psum_packed(tree, "data", pack_below=1000))
reference_fn = compiled(lambda tree: jax.lax.psum(tree, "data"))
packed, reference = packed_fn(tree), reference_fn(tree)
print(json.dumps({
    "max_difference": {name: float(jnp.abs(packed[name].astype(jnp.float32)
                                           - reference[name].astype(jnp.float32)).max())
                       for name in tree},
    "dtypes": {name: str(packed[name].dtype) for name in tree},
    "shapes": {name: list(packed[name].shape) for name in tree},
    "packed_operands": all_reduce_operands(packed_fn),
    "reference_operands": all_reduce_operands(reference_fn),
}))
"""

STEP_SCRIPT = """
import functools, json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from benchmarks import model_configs
from training import steps
from training.sharding import DATA_AXIS, data_mesh
from training.tasks import masked_loss

mesh = data_mesh()
model = model_configs.build(model_configs.mamba_config(d_model=32, num_layers=2, d_state=8,
                                                      expand=2, scan="sequential"))
state = steps.create_train_state(model, optax.adam(1e-2), optax.constant_schedule(1e-2))
state = jax.device_put(state, NamedSharding(mesh, P()))
rng = np.random.default_rng(0)
# 2 micro-batches of 4 rows of 12 positions, scoring different numbers of positions per row and
# per micro-batch, so each micro-batch's mean weighs its rows as the whole micro-batch does.
inputs = rng.integers(0, 256, (2, 4, 12), np.int32)
mask = np.zeros((2, 4, 12), bool)
for micro_batch, row, scored in [(0, 0, 12), (0, 1, 3), (0, 2, 7), (0, 3, 1),
                                 (1, 0, 2), (1, 1, 12), (1, 2, 5), (1, 3, 9)]:
    mask[micro_batch, row, -scored:] = True
batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=2), "loss_mask": mask}
batch = jax.device_put(batch, NamedSharding(mesh, P(None, DATA_AXIS)))

partitioned = jax.jit(functools.partial(steps.train_step, loss_fn=masked_loss))
data_parallel = jax.jit(functools.partial(steps.train_step, loss_fn=masked_loss,
                                          data_parallel_mesh=mesh))
results = {}
# The whole batch, and its first micro-batch alone (the data-parallel step without a loop).
for size in (2, 1):
    for name, step in [("partitioned", partitioned), ("data_parallel", data_parallel)]:
        new_state, metrics = step(state, jax.tree.map(lambda x: x[:size], batch))
        results[f"{name}_{size}"] = {
            "metrics": {key: float(value) for key, value in metrics.items()},
            "params": [np.asarray(leaf).ravel().tolist()
                       for leaf in jax.tree.leaves(new_state.params)]}

# bfloat16 parameters: the gradients, and so the optimizer state, must keep that dtype.
params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state.params)
state16 = state.replace(params=params16, opt_state=state.tx.init(params16))
for size in (2, 1):
    for name, step in [("partitioned", partitioned), ("data_parallel", data_parallel)]:
        new_state, metrics = step(state16, jax.tree.map(lambda x: x[:size], batch))
        results[f"{name}_bfloat16_{size}"] = {
            "metrics": {key: float(value) for key, value in metrics.items()},
            "dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(
                (new_state.params, new_state.opt_state))})}

# The loss by hand: each micro-batch's summed cross entropy over its scored positions, divided
# by their count, then the mean over micro-batches.
logits = jnp.stack([model(jnp.asarray(rows)) for rows in inputs])
losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(inputs, -1, axis=2))
per_micro_batch = (losses * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
results["loss_by_hand"] = float(per_micro_batch.mean())
print(json.dumps(results))
"""


def run_on_two_devices(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2"), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def packed_sums():
    return run_on_two_devices(PSUM_SCRIPT)


def test_psum_packed_equals_psum_per_leaf(packed_sums):
    for name, difference in packed_sums["max_difference"].items():
        assert difference == 0.0, name


def test_psum_packed_keeps_dtypes_and_shapes(packed_sums):
    assert packed_sums["dtypes"] == {"scalar": "float32", "vector": "float32",
                                     "matrix": "float32", "large": "float32",
                                     "half": "bfloat16", "count": "int32"}
    assert packed_sums["shapes"] == {"scalar": [], "vector": [7], "matrix": [3, 5],
                                     "large": [40, 30], "half": [4], "count": []}


def test_psum_packed_packs_small_leaves_per_dtype(packed_sums):
    # psum: an all-reduce operand per leaf, 6 (XLA may split them over several all-reduces).
    # psum_packed: 4 (the float32 small leaves packed, the bfloat16 leaf, the int32 leaf, and
    # the 1,200-element leaf on its own).
    assert sum(packed_sums["reference_operands"]) == 6
    assert sum(packed_sums["packed_operands"]) == 4


@pytest.fixture(scope="module")
def two_steps():
    return run_on_two_devices(STEP_SCRIPT)


@pytest.mark.parametrize("micro_batches", [2, 1])
def test_data_parallel_step_matches_partitioned_step(two_steps, micro_batches):
    partitioned = two_steps[f"partitioned_{micro_batches}"]
    data_parallel = two_steps[f"data_parallel_{micro_batches}"]
    for key, value in partitioned["metrics"].items():
        assert data_parallel["metrics"][key] == pytest.approx(value, rel=1e-5), key
    for expected, actual in zip(partitioned["params"], data_parallel["params"], strict=True):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_data_parallel_loss_matches_hand(two_steps):
    assert two_steps["data_parallel_2"]["metrics"]["loss"] == pytest.approx(
        two_steps["loss_by_hand"], rel=1e-5)


@pytest.mark.parametrize("micro_batches", [2, 1])
def test_data_parallel_step_keeps_bfloat16(two_steps, micro_batches):
    partitioned = two_steps[f"partitioned_bfloat16_{micro_batches}"]
    data_parallel = two_steps[f"data_parallel_bfloat16_{micro_batches}"]
    assert partitioned["dtypes"] == ["bfloat16", "int32"]
    assert data_parallel["dtypes"] == ["bfloat16", "int32"]
    # Loss and norms agree to bfloat16's precision (8 bits of mantissa).
    for key, value in partitioned["metrics"].items():
        assert data_parallel["metrics"][key] == pytest.approx(value, rel=2e-2), key
