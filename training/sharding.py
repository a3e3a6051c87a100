"""Data parallelism: a one-axis device mesh, replicated state and batches sharded over `data`."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """Return a mesh over every device of every process, with the single axis `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (micro-batches, sequences, tokens) batch: sequences split over `data`."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (sequences, tokens) batch: sequences split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_train_batch(local_batch_bt: np.ndarray, accumulation_steps: int,
                       mesh: Mesh) -> jax.Array:
    """Assemble this process's rows (b_local, t + 1) into the global (a, m, t + 1) batch.

    Micro-batch i contains rows i * m_local ... (i + 1) * m_local - 1 of every process, so its
    contents do not depend on the number of devices.
    """
    rows, length = local_batch_bt.shape
    local_amt = local_batch_bt.reshape(accumulation_steps, rows // accumulation_steps, length)
    return jax.make_array_from_process_local_data(train_batch_sharding(mesh), local_amt)


def global_eval_batch(batch_bt: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a validation batch that every process has in full, sharded over `data`."""
    batch_bt = np.asarray(batch_bt)
    return jax.make_array_from_callback(batch_bt.shape, eval_batch_sharding(mesh),
                                        lambda index: batch_bt[index])
