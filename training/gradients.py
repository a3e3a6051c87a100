"""Sums over devices in a few large all-reduces, for the gradients of data-parallel training.

A `jax.lax.psum` of a pytree is one all-reduce with an operand per leaf. XLA's CPU runtime
(jaxlib 0.10.2) makes the devices' threads meet once per operand: 44 times per step for the
Mamba model of `benchmarks/peers.py`, whose profile showed 88 rendezvous per step on 2 devices.
`psum_packed` concatenates the small leaves into one array per dtype first, which leaves 9
operands for that model (its 8 largest kernels and one packed array). Its training step on 2 CPU
devices took 2.6 to 3.6% less time with this (benchmarks/README.md).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Leaves with fewer elements are packed. Larger ones (the Mamba benchmark model's in_proj and
# out_proj kernels, 262,144 and 131,072 elements) are summed as they are, because packing them
# would add a copy of each.
PACK_BELOW = 100_000


def psum_packed(tree: Any, axis_name, *, pack_below: int = PACK_BELOW) -> Any:
    """Return `jax.lax.psum(tree, axis_name)`, with leaves of fewer than `pack_below` elements
    summed as one concatenated array per dtype. Call it where `psum` is allowed (inside
    `jax.shard_map`)."""
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict[np.dtype, list[int]] = {}
    large = []
    for index, leaf in enumerate(leaves):
        if np.size(leaf) < pack_below:
            groups.setdefault(jnp.result_type(leaf), []).append(index)
        else:
            large.append(index)

    packed = [jnp.concatenate([jnp.ravel(leaves[index]) for index in indices])
              for indices in groups.values()]
    sums = jax.lax.psum(packed + [leaves[index] for index in large], axis_name)

    summed = list(leaves)
    for total, indices in zip(sums[:len(packed)], groups.values()):
        offset = 0
        for index in indices:
            size = int(np.size(leaves[index]))
            summed[index] = total[offset:offset + size].reshape(np.shape(leaves[index]))
            offset += size
    for total, index in zip(sums[len(packed):], large):
        summed[index] = total
    return jax.tree.unflatten(treedef, summed)
