"""Training state and the pure train and eval steps, each to be wrapped in `jax.jit` once.

The model is split once into its graph definition (static, part of the state's tree structure)
and its parameters (plain nested dicts of arrays). The compiled step is therefore a pure function
of arrays, and it never walks the NNX module graph in Python.

Batches are int32 byte tokens. A training batch has shape (a, m, t + 1): `a` micro-batches of
`m` sequences, whose gradients are averaged into one optimizer step; an eval batch is (b, t + 1).
Position i predicts token i + 1.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from training.gradients import psum_packed
from training.sharding import batch_axes

LN_2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, and everything a checkpoint holds.

    `graphdef` and `tx` are static: they are part of the tree structure, not leaves.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: Any  # nested dict of float32 arrays (`nnx.Param` values)
    rest: Any  # nested dict of the model's non-parameter variables (not trained)
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    learning_rate: optax.Schedule = flax.struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        """Return the NNX model with this state's parameters (for notebooks and sampling)."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       learning_rate: optax.Schedule) -> TrainState:
    """Split `model` once and initialise the optimizer on its parameters; the step starts at 0."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=nnx.to_pure_dict(rest),
                      opt_state=tx.init(params), graphdef=graphdef, tx=tx,
                      learning_rate=learning_rate)


def sequence_loss(params: Any, state: TrainState, tokens_bt: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Return the summed cross entropy in nats of next-token prediction, and the token count."""
    model = nnx.merge(state.graphdef, params, state.rest)
    logits_btv = model(tokens_bt[:, :-1])
    targets_bt = tokens_bt[:, 1:]
    losses_bt = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv.astype(jnp.float32), targets_bt)
    return losses_bt.sum(), jnp.asarray(targets_bt.size, jnp.float32)


def _mean_loss(params: Any, state: TrainState, tokens_bt: jax.Array, loss_fn) -> jax.Array:
    loss_sum, count = loss_fn(params, state, tokens_bt)
    return loss_sum / count


def train_step(state: TrainState, batch_amt: jax.Array, loss_fn=sequence_loss,
               data_parallel_mesh: Mesh | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Take one optimizer step on a batch of `a` micro-batches (a, m, t + 1).

    `loss_fn(params, state, micro_batch) -> (loss_sum, count)` defaults to next-token prediction
    on token rows; `training.tasks.masked_loss` takes a dict batch whose arrays are (a, m, t).
    Bind it with `functools.partial` before `jax.jit`.

    With `data_parallel_mesh`, whose devices must all hold the whole state, the gradients come
    from `data_parallel_loss_and_grads` (each device computes its rows, and the sums over devices
    are few large all-reduces); without it, `jax.jit` partitions the step by the shardings of
    its inputs. Both give the same loss and gradients up to float rounding.

    Returns the new state and metrics of this step: the mean loss in nats per token over the
    whole batch, the global gradient norm before clipping, the learning rate used, and the
    global norm of the updated parameters.
    """
    if data_parallel_mesh is None:
        loss, grads = _loss_and_grads(state, batch_amt, loss_fn)
    else:
        # Without the optimizer state, which the rules may shard even where the parameters are
        # replicated: shard_map would gather it onto every device for nothing.
        context = state.replace(opt_state=None)
        loss, grads = data_parallel_loss_and_grads(loss_fn, state.params, context, batch_amt,
                                                   data_parallel_mesh)

    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": state.learning_rate(state.step),
        "param_norm": optax.global_norm(params),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _loss_and_grads(state: TrainState, batch_amt: jax.Array, loss_fn) -> tuple[jax.Array, Any]:
    """Return the mean over micro-batches of each one's mean loss, and its gradients."""
    grad_fn = jax.value_and_grad(_mean_loss)

    def accumulate(carry, tokens_mt):
        loss_total, grads_total = carry
        loss, grads = grad_fn(state.params, state, tokens_mt, loss_fn)
        grads_total = jax.tree.map(jnp.add, grads_total, grads)
        return (loss_total + loss, grads_total), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_total, grads_total), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros), batch_amt)

    # Micro-batches have equal sizes (and the synthetic tasks score the same number of positions
    # in every sequence), so the mean of their means is the mean over the batch.
    num_micro_batches = jax.tree.leaves(batch_amt)[0].shape[0]
    loss = loss_total / num_micro_batches
    grads = jax.tree.map(lambda g: g / num_micro_batches, grads_total)
    return loss, grads


def data_parallel_loss_and_grads(loss_fn, params: Any, context: Any, batch_amt: Any, mesh: Mesh
                                 ) -> tuple[jax.Array, Any]:
    """Return the mean over micro-batches of each one's mean loss, and its gradients, with each
    device computing the loss and gradients of its own rows.

    `loss_fn(params, context, micro_batch) -> (loss_sum, count)`. `params` and `context` are
    replicated on every device of `mesh`, and the rows (axis 1) of every array of `batch_amt`
    (a, m, ...) are split over its batch axes, as `train_batch_sharding` places them. Each
    device sums its rows' losses and gradients, and `psum_packed` sums them over the devices
    once per step, in a few large all-reduces (see `training/gradients.py`). With several
    micro-batches, the token count of each is also summed over the devices before its mean.
    """
    axes = batch_axes(mesh)
    local = functools.partial(_local_loss_and_grads, loss_fn, axes=axes)
    # check_vma=False: the custom gradient rules of `ssm.cpu_kernel` do not mark their outputs
    # as varying over devices. The out_specs hold because every output comes out of a psum.
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(),
                                                     PartitionSpec(None, axes)),
                         out_specs=PartitionSpec(), check_vma=False)(params, context, batch_amt)


def _divide(gradient: jax.Array, count: jax.Array) -> jax.Array:
    """Return gradient / count in the gradient's dtype (the float32 count would promote a
    bfloat16 gradient, which the optimizer state and the scan carry would then not match)."""
    return (gradient / count).astype(gradient.dtype)


def _local_loss_and_grads(loss_fn, params: Any, context: Any, batch_amt: Any, *,
                          axes: tuple[str, ...]) -> tuple[jax.Array, Any]:
    """Inside `jax.shard_map`: this device's share of `data_parallel_loss_and_grads`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro_batches = jax.tree.leaves(batch_amt)[0].shape[0]
    if num_micro_batches == 1:
        # The count joins the one sum over devices, so the devices meet only once.
        (loss_sum, count), grads = grad_fn(params, context, jax.tree.map(lambda x: x[0],
                                                                          batch_amt))
        loss_sum, count, grads = psum_packed((loss_sum, count, grads), axes)
        return loss_sum / count, jax.tree.map(lambda g: _divide(g, count), grads)

    def accumulate(carry, batch_mt):
        loss_total, grads_total = carry
        (loss_sum, count), grads = grad_fn(params, context, batch_mt)
        # The micro-batch's count over all devices: the sums below then add up to its mean.
        count = jax.lax.psum(count, axes)
        grads_total = jax.tree.map(lambda total, g: total + _divide(g, count), grads_total, grads)
        return (loss_total + loss_sum / count, grads_total), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_total, grads_total), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros), batch_amt)

    loss_total, grads_total = psum_packed((loss_total, grads_total), axes)
    return (loss_total / num_micro_batches,
            jax.tree.map(lambda g: g / num_micro_batches, grads_total))


def eval_step(state: TrainState, batch_bt: jax.Array) -> dict[str, jax.Array]:
    """Return the summed loss in nats and the number of predicted tokens of one eval batch."""
    loss_sum, count = sequence_loss(state.params, state, batch_bt)
    return {"loss_sum": loss_sum, "token_count": count}


def bits_per_byte(loss_nats_per_token: float) -> float:
    """Convert a mean loss in nats per byte token to bits per byte."""
    return loss_nats_per_token / LN_2
