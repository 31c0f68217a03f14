"""Mesh construction and the one table that maps logical axis names onto mesh axes.

Parameters carry logical axes (see model/params.py); activations are constrained with `constrain(x, axes)`.
Change parallelism by changing `LOGICAL_RULES` or the mesh shape, never the model code.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
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


def logical_to_pspec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                     rules: dict | None = None) -> P:
    """PartitionSpec for logical axes. With `shape` and `mesh`, a dimension the mesh axes do not divide is
    replicated instead (e.g. a 3806-class head over tensor=4), so every config shards without hand edits."""
    rules = LOGICAL_RULES if rules is None else rules
    out, used = [], set()
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used and (mesh is None or t in mesh.shape))
        if shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
            if shape[i] % size:
                targets = ()
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


def param_shardings(axes_tree, abstract_tree, mesh: Mesh):
    """NamedShardings for a params tree given its logical axes and shapes."""
    return jax.tree.map(
        lambda axes, a: NamedSharding(mesh, logical_to_pspec(axes, a.shape, mesh)),
        axes_tree, abstract_tree, is_leaf=lambda x: isinstance(x, tuple),
    )


_ACTIVE_MESH: list[Mesh] = []


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Make `constrain` place activations on `mesh` while tracing inside this context."""
    if mesh is None:
        yield
        return
    _ACTIVE_MESH.append(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.pop()


def active_mesh_size() -> int:
    """Devices of the mesh `activation_mesh` set while tracing (1 outside it)."""
    return _ACTIVE_MESH[-1].devices.size if _ACTIVE_MESH else 1


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `activation_mesh` (single-device code paths)."""
    if not _ACTIVE_MESH:
        return x
    mesh = _ACTIVE_MESH[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_pspec(axes, x.shape, mesh)))
