"""Mesh construction, the one table that maps logical axis names onto mesh axes, and the helpers that place
parameters and batches.

Parameters carry logical axes (see model/params.py); activations are constrained with `constrain(x, axes)`, which
reads JAX's own context mesh (`jax.set_mesh(mesh)` around the call of a jitted function) and is a no-op without
one. Change parallelism by changing `LOGICAL_RULES` or the mesh shape, never the model code.

Divisibility is explicit: a batch whose rows do not split over the batch axes raises (`shard_batch`); a parameter
dimension that a mesh axis does not divide (e.g. a 3806-class head over tensor=4) is replicated on that dimension,
and `param_shardings` logs each such choice once.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llavaction_jax.config import ExecutionConfig, ResolvedExecution
from llavaction_jax.tree import flatten_paths, unflatten_paths

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",  # the KV cache's heads (model/decode.py)
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "patch": None,
    "classes": None,
    "tokens": None,
}
BATCH_AXES = LOGICAL_RULES["batch"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (GSPMD propagation); -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into data={data} fsdp={fsdp} tensor={tensor}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def platform_of(mesh: Mesh | None = None) -> str:
    """"cpu", "gpu" or "tpu": the platform of the mesh's devices (default: JAX's default devices)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)


def resolve_execution(execution: ExecutionConfig, mesh: Mesh | None = None) -> ResolvedExecution:
    """`execution` fixed for the devices it will run on (`ExecutionConfig.resolve`): what entry points (the API,
    train, eval, benchmarks) call once before tracing."""
    return execution.resolve(platform_of(mesh), mesh.devices.size if mesh is not None else 1)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=1,tensor=2" -> make_mesh keyword arguments; unnamed axes keep make_mesh's defaults."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {text!r}: expected axis=N items over {MESH_AXES} (N may be -1 once), got {item!r}")
        out[name.strip()] = int(value)
    return out


def logical_to_pspec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None,
                     rules: dict | None = None) -> P:
    """PartitionSpec for logical axes. With `shape` and `mesh` (a Mesh or AbstractMesh), a dimension the mesh axes
    do not divide is replicated instead (see `param_shardings`, which logs it)."""
    return _pspec(axes, shape, mesh, rules)[0]


def _pspec(axes, shape, mesh, rules):
    """(PartitionSpec, [(dim, logical name, size, mesh axes) that were replicated because they do not divide])."""
    rules = LOGICAL_RULES if rules is None else rules
    out, used, replicated = [], set(), []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used and (mesh is None or t in mesh.shape))
        if shape is not None and mesh is not None:
            ways = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
            if shape[i] % ways:
                replicated.append((i, name, shape[i], targets))
                targets = ()
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out), replicated


def param_shardings(specs, mesh: Mesh, flat: bool = False) -> dict:
    """NamedShardings on `mesh` for parameters described by their logical axes and shapes: a tree of `ParamSpec`s
    (model/params.py), or the converter's flat {path: Param}. Dimensions the mesh does not divide are replicated
    and logged once per parameter. Returns the same nesting as `specs` (flat {path: sharding} with `flat`)."""
    out = {}
    for path, spec in flatten_paths(specs).items():
        pspec, replicated = _pspec(spec.axes, spec.shape, mesh, None)
        for dim, name, size, targets in replicated:
            logger.info("param %s: dim %d (%s, size %d) is replicated: mesh axes %s of %s do not divide it",
                        path, dim, name, size, "x".join(targets), dict(mesh.shape))
        out[path] = NamedSharding(mesh, pspec)
    return out if flat else unflatten_paths(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the batch axes, the rest replicated: one sharding serves every batch array."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_ways(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(arrays, mesh: Mesh | None):
    """This process's rows (a pytree of host arrays, leading batch dim) -> global jax Arrays split over the batch
    axes. Every process passes its own rows, the same count each. Without a mesh: plain device arrays.

    Raises a ValueError naming the axes, size and mesh when the global batch does not split over them."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, arrays)
    sharding, ways = batch_sharding(mesh), batch_ways(mesh)

    def put(x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % ways:
            raise ValueError(f"a batch of {rows} rows does not split over mesh axes {' x '.join(BATCH_AXES)} = {ways} "
                             f"(mesh {dict(mesh.shape)}); choose a batch size that is a multiple of {ways}")
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree.map(put, arrays)


def local_rows(arrays, mesh: Mesh | None):
    """Inverse of `shard_batch`: global arrays split over the batch axes -> numpy arrays of this process's rows."""
    if mesh is None or jax.process_count() == 1:
        return jax.tree.map(np.asarray, arrays)

    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(arrays, mesh, P(BATCH_AXES)))


def use_mesh(mesh: Mesh | None):
    """JAX's context mesh for calls of jitted functions whose activations `constrain` places (no-op for None)."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes on JAX's context mesh (`jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_pspec(axes, x.shape, mesh))
