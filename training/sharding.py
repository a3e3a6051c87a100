"""Device mesh, shardings of the training state and of batches.

The mesh has two axes: `data` (batch rows only) and `fsdp` (batch rows, and parameter and
optimizer-state dimensions, as in fully sharded data parallelism). Batches are split over both
axes, so every device receives different rows. Parameters follow `config.mesh.rules`: a list of
(regular expression, mesh axis or None) pairs. The first expression found (`re.search`) in a
leaf's path, for example "params/blocks/0/mixer/in_proj/kernel" or
"opt_state/1/0/mu/blocks/0/mixer/in_proj/kernel", decides: None keeps the leaf replicated, a mesh
axis splits the leaf's largest dimension that the axis size divides. Leaves with fewer than two
dimensions (norm scales, biases, `D`, counters), leaves that no rule matches and leaves without
such a dimension stay replicated. With `mesh.fsdp = 1` every leaf is in effect replicated, which
is plain data parallelism.

`config.mesh.logical_rules`, when not empty, takes precedence for the leaves that `LOGICAL_AXES`
names: a list of (logical axis name, mesh axis or None) pairs. Each dimension of such a leaf gets
the mesh axis of its logical name (first rule wins), provided the axis size divides the dimension
and no earlier dimension of the leaf uses that axis. Other leaves follow `mesh.rules`.
"""

import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis names of each parameter's dimensions, found by a regular expression searched in
# its path. The names are "vocab" (vocabulary rows), "embed" (model width d), "mlp" (Mamba's
# expanded width e and the feed-forward width f) and "heads" (heads times head dimension).
LOGICAL_AXES = (
    (r"embedding/embedding(/|$)", ("vocab", "embed")),
    (r"(^|/)head/kernel(/|$)", ("embed", "vocab")),
    (r"mixer/in_proj/kernel(/|$)", ("embed", "mlp")),
    (r"mixer/out_proj/kernel(/|$)", ("mlp", "embed")),
    (r"mixer/x_proj/kernel(/|$)", ("mlp", None)),
    (r"mixer/dt_proj/kernel(/|$)", (None, "mlp")),
    (r"mixer/conv1d/kernel(/|$)", (None, "mlp")),
    (r"mixer/A_log(/|$)", ("mlp", None)),
    (r"attention/(query|key|value)_proj/kernel(/|$)", ("embed", "heads")),
    (r"attention/out_proj/kernel(/|$)", ("heads", "embed")),
    (r"feed_forward/(gate|up)_proj/kernel(/|$)", ("embed", "mlp")),
    (r"feed_forward/down_proj/kernel(/|$)", ("mlp", "embed")),
)
LOGICAL_AXIS_NAMES = ("vocab", "embed", "mlp", "heads")


def logical_axis_names(path: str, ndim: int) -> tuple[str | None, ...] | None:
    """Return the logical axis names of the leaf at `path`, or None if `LOGICAL_AXES` has none."""
    for pattern, names in LOGICAL_AXES:
        if re.search(pattern, path) and len(names) == ndim:
            return names
    return None


def data_mesh() -> Mesh:
    """Return a mesh over every device of every process, with the single axis `data`."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Return the mesh axes that batch rows are split over (`data`, then `fsdp` if present)."""
    return tuple(axis for axis in MESH_AXES if axis in mesh.axis_names)


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (micro-batches, sequences, tokens) batch: sequences split over the batch
    axes."""
    return NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh)))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (sequences, tokens) batch: sequences split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def global_train_batch(batch_bt: np.ndarray, accumulation_steps: int, mesh: Mesh) -> jax.Array:
    """Place the global batch (b, t + 1), which every process has in full, as (a, m, t + 1).

    Micro-batch i contains rows i * m ... (i + 1) * m - 1 of the global batch. Each process
    copies only the rows of its own devices, so the batch, and with it the losses, do not
    depend on the number of processes or devices.
    """
    rows, length = batch_bt.shape
    batch_amt = np.asarray(batch_bt).reshape(accumulation_steps, rows // accumulation_steps,
                                             length)
    return jax.make_array_from_callback(batch_amt.shape, train_batch_sharding(mesh),
                                        lambda index: batch_amt[index])


def global_eval_batch(batch_bt: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a validation batch that every process has in full, split over the batch axes."""
    batch_bt = np.asarray(batch_bt)
    return jax.make_array_from_callback(batch_bt.shape, eval_batch_sharding(mesh),
                                        lambda index: batch_bt[index])


# ---- mesh and state shardings from `config.mesh`


def default_mesh_config() -> ml_collections.ConfigDict:
    """Return the `mesh` section: all devices on `data`, parameters replicated."""
    mesh = ml_collections.ConfigDict()
    # Devices along the batch-only axis; -1 takes every device that `fsdp` leaves.
    mesh.data = -1
    # Devices that split each large parameter and its optimizer state (and batch rows too);
    # 1 keeps parameters replicated (plain data parallelism).
    mesh.fsdp = 1
    # (regular expression searched in the leaf path, mesh axis or None) pairs, first match
    # wins (see the module docstring). The default splits every matrix over `fsdp`.
    mesh.rules = ((".*", FSDP_AXIS),)
    # (logical axis name, mesh axis or None) pairs; when not empty they decide for every leaf
    # that has logical names, e.g. (("vocab", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp")).
    mesh.logical_rules = ()
    return mesh


def mesh_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Return `config.mesh`, or the default section for configs saved without one."""
    return config.mesh if "mesh" in config else default_mesh_config()


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Return the size of each mesh axis for `num_devices` devices, raising ValueError for a
    shape that does not fit them or a rule that names an unknown axis."""
    section = mesh_section(config)
    data, fsdp = section.data, section.fsdp
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"invalid config field mesh.fsdp={fsdp!r}; allowed: an integer >= 1 "
                         f"that divides the number of devices ({num_devices})")
    if not isinstance(data, int) or (data < 1 and data != -1):
        raise ValueError(f"invalid config field mesh.data={data!r}; allowed: -1 (every device "
                         "that mesh.fsdp leaves) or an integer >= 1")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(f"invalid config field mesh.fsdp={fsdp}; allowed: a divisor of the "
                             f"number of devices ({num_devices})")
        data = num_devices // fsdp
    if data * fsdp != num_devices:
        raise ValueError(f"invalid config fields mesh.data={data}, mesh.fsdp={fsdp}: their "
                         f"product must equal the number of devices ({num_devices}); set "
                         "mesh.data=-1 to use every device")

    check_mesh_rules(section)
    return {DATA_AXIS: data, FSDP_AXIS: fsdp}


# Pair forms of the two rule fields, and an example of each.
RULE_FORMS = {"rules": ("(regular expression, mesh axis or None)", '((".*", "fsdp"),)'),
              "logical_rules": ("(logical axis name, mesh axis or None)", '(("mlp", "fsdp"),)')}


def check_mesh_rules(section: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field for `mesh.rules` or `mesh.logical_rules` of the wrong form.

    Both are sequences of pairs. () is no rules: an empty `rules` replicates every parameter, and
    an empty `logical_rules` leaves every leaf to `rules`.
    """
    for name, (pair_form, example) in RULE_FORMS.items():
        rules = section.get(name, ())
        if not isinstance(rules, (list, tuple)):
            raise ValueError(
                f"invalid config field mesh.{name}={rules!r}; allowed: a tuple of {pair_form} "
                f"pairs such as {example}, or () for no rules (--config.mesh.{name}='()' on the "
                "command line)")
        for index, rule in enumerate(rules):
            if not isinstance(rule, (list, tuple)) or len(rule) != 2:
                raise ValueError(f"invalid config field mesh.{name}[{index}]={rule!r}; allowed: "
                                 f"a {pair_form} pair")

    for index, (pattern, axis) in enumerate(section.get("rules", ())):
        rule = (pattern, axis)
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"invalid config field mesh.rules[{index}]={rule!r}: unknown "
                             f"mesh axis {axis!r}; allowed: {', '.join(MESH_AXES)} or None")
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"invalid config field mesh.rules[{index}]={rule!r}: "
                             f"{pattern!r} is not a regular expression ({error})") from None
    for index, (name, axis) in enumerate(section.get("logical_rules", ())):
        rule = (name, axis)
        if name not in LOGICAL_AXIS_NAMES:
            raise ValueError(f"invalid config field mesh.logical_rules[{index}]={rule!r}: "
                             f"unknown logical axis {name!r}; allowed: "
                             f"{', '.join(LOGICAL_AXIS_NAMES)}")
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"invalid config field mesh.logical_rules[{index}]={rule!r}: "
                             f"unknown mesh axis {axis!r}; allowed: {', '.join(MESH_AXES)} or None")


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """Return the (data, fsdp) mesh over every device of every process.

    `fsdp` is the inner axis, so a group of devices that shares parameters consists of
    consecutive devices, which are on one host whenever `fsdp` divides the devices per host.
    """
    shape = mesh_shape(config, jax.device_count())
    devices = np.asarray(jax.devices()).reshape(shape[DATA_AXIS], shape[FSDP_AXIS])
    return Mesh(devices, MESH_AXES)


def leaf_path(path: tuple) -> str:
    """Return a pytree key path as "params/blocks/0/mixer/kernel" (the form rules match)."""
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_partition_spec(path: str, shape: tuple[int, ...], rules, mesh: Mesh,
                        logical_rules=()) -> PartitionSpec:
    """Return the PartitionSpec that `logical_rules` or `rules` give a leaf of `shape` at `path`
    (see the module docstring)."""
    if len(shape) < 2:
        return PartitionSpec()
    names = logical_axis_names(path, len(shape)) if logical_rules else None
    if names is not None:
        spec, used = [], set()
        for name, dim_size in zip(names, shape):
            axis = next((rule_axis for rule_name, rule_axis in logical_rules
                         if rule_name == name), None)
            fits = (axis in mesh.shape and axis not in used and mesh.shape[axis] > 1
                    and dim_size % mesh.shape[axis] == 0)
            spec.append(axis if fits else None)
            if fits:
                used.add(axis)
        return PartitionSpec(*spec)
    axis = next((rule_axis for pattern, rule_axis in rules if re.search(pattern, path)), None)
    if axis is None or axis not in mesh.shape:
        return PartitionSpec()
    size = mesh.shape[axis]
    divisible = [dim for dim in range(len(shape)) if shape[dim] % size == 0]
    if size == 1 or not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda index: shape[index])  # The first of equally large dims.
    return PartitionSpec(*[axis if index == dim else None for index in range(len(shape))])


def state_shardings(state: Any, config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """Return a tree like the training state `state` (arrays or ShapeDtypeStructs) of
    NamedShardings: `params` and `opt_state` by `config.mesh.rules`, the rest replicated."""
    rules = [tuple(rule) for rule in mesh_section(config).rules]
    logical_rules = [tuple(rule) for rule in mesh_section(config).get("logical_rules", ())]

    def sharding(path, leaf):
        name = leaf_path(path)
        if not (name.startswith("params/") or name.startswith("opt_state/")):
            return replicated(mesh)
        return NamedSharding(mesh, leaf_partition_spec(name, tuple(leaf.shape), rules, mesh,
                                                       logical_rules))

    return jax.tree_util.tree_map_with_path(sharding, state)
