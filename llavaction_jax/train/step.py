"""The jitted, sharded training step: loss, gradient accumulation over micro-batches, AdamW update.

Loss = LM cross-entropy + 0.1 x the vision-supervision loss (llavaction_jax/losses.py), reduced as `reduction`
says. "sample" (upstream's weighting): every micro-batch divides its sum of per-sample losses by the number of
samples with targets in the whole global batch, so the micro-batch gradients add up to the gradient of the mean
over all its samples. "token": each micro-batch's loss is its own token mean, and the gradient the mean of the
micro-batch gradients, like HF Trainer's accumulation. Accumulation is a `lax.scan`, so memory holds one
micro-batch of activations.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from llavaction_jax import losses
from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import llava
from llavaction_jax.sharding import batch_sharding, param_shardings, use_mesh
from llavaction_jax.train.optim import freeze


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def loss_fn(params: dict, cfg: ModelConfig, execution: ResolvedExecution, batch: dict, reduction: str = "sample",
            num_samples=None):
    out = llava.forward(params, cfg, execution, batch["input_ids"], batch.get("pixel_values"),
                        batch.get("attention_mask"), batch["labels"], batch.get("has_video"),
                        num_frames=batch.get("num_frames"))
    computed = losses.compute_losses(params, cfg, execution, out, batch.get("actions"), reduction=reduction,
                                     num_samples=num_samples)
    metrics = {"loss": computed.loss, "lm_loss": computed.lm_loss, "aux_loss": computed.aux_loss,
               "tokens": computed.targets}
    return computed.loss, metrics


def split_micro(batch: dict, n_micro: int) -> dict:
    """(B, ...) -> (n_micro, B / n_micro, ...). Micro-batch m takes rows m, m + n, m + 2n, ... so that each
    device's contiguous shard of the batch feeds every micro-batch equally (no cross-device reshuffle)."""
    def split(x):
        if x.shape[0] % n_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n_micro} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(cfg: ModelConfig, execution: ResolvedExecution, tx: optax.GradientTransformation, groups: dict,
                    n_micro: int = 1, schedules: dict[str, Callable] | None = None, reduction: str = "sample"):
    """A pure `step(state, batch) -> (state, metrics)`; `jit_train_step` jits it for a mesh. `execution` must be
    resolved for the mesh (`sharding.resolve_execution`): an unresolved one is refused here, before tracing;
    `groups` are the optimizer groups of `train.optim.param_groups` (frozen parameters get no gradient);
    `reduction`: "sample" or "token" (above)."""
    execution = require_resolved(execution, "make_train_step")
    if reduction not in losses.REDUCTIONS:
        raise ValueError(f"train.loss_reduction={reduction!r}; expected one of {losses.REDUCTIONS}")
    per_sample = reduction == "sample"

    def step(state, batch):
        n = losses.count_samples(batch["labels"]) if per_sample else None  # the global batch's, for every micro
        grad_fn = jax.value_and_grad(lambda p, b: loss_fn(freeze(p, groups), cfg, execution, b, reduction, n),
                                     has_aux=True)
        micro = split_micro(batch, n_micro)

        def accumulate(grads, mb):
            (_, m), g = grad_fn(state["params"], mb)
            return jax.tree.map(jnp.add, grads, g), m

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, per_micro = jax.lax.scan(accumulate, zeros, micro, unroll=execution.loop_collectives == "off")
        if not per_sample:  # each micro-batch loss is a mean of its own: average them
            grads = jax.tree.map(lambda g: g / n_micro, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        combine = jnp.sum if per_sample else jnp.mean  # "sample": the micro-batch losses are parts of one mean
        metrics = {k: combine(v) for k, v in per_micro.items() if k != "tokens"}
        metrics["tokens"] = per_micro["tokens"].sum()
        metrics["grad_norm"] = optax.tree.norm(grads)
        for group, schedule in (schedules or {}).items():
            metrics[f"lr_{group}"] = schedule(state["step"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return step


def state_shardings(state: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """Params by their logical axes; optimizer moments like the param they belong to; everything else replicated."""
    p_shard = param_shardings(llava.param_specs(cfg), mesh)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def for_leaf(path, _):
        # optax moments (mu, nu) mirror the params tree: the trailing dict keys of a leaf's path are a param path.
        tail = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            tail.append(k.key)
        node = p_shard
        for k in reversed(tail):
            node = node.get(k) if isinstance(node, dict) else None
        return node if isinstance(node, NamedSharding) else replicated

    return {"step": replicated, "params": p_shard,
            "opt_state": jax.tree_util.tree_map_with_path(for_leaf, state["opt_state"])}


def jit_train_step(step_fn, state: dict, cfg: ModelConfig, mesh: Mesh | None):
    """`step_fn` jitted once, state donated; on a mesh with explicit state shardings and every batch array split
    over the batch axes (`sharding.shard_batch` places batches that way). Returns a callable that runs the step
    under the mesh context; JAX compiles once per batch shape (length bucket)."""
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    s_shard = state_shardings(state, cfg, mesh)
    jitted = jax.jit(step_fn, in_shardings=(s_shard, batch_sharding(mesh)), out_shardings=(s_shard, None),
                     donate_argnums=0)

    def run(state, batch):
        with use_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for ahead-of-time lowering (bench.aot_programs)
    return run
