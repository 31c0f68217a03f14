"""Parameter specs: one tree that defines every parameter's shape, logical axes and initialiser.

Model files describe their parameters as nested dicts of `ParamSpec`; `init_params` turns such a tree into
arrays and `logical_axes` into the matching tree of axis-name tuples that `sharding.py` maps onto the mesh.
Stacked decoder layers simply carry a leading "layers" axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from llavaction_jax.tree import flatten_paths

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def normal(std: float = 0.02) -> Init:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Init = normal()

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and logical axes {self.axes} differ in rank")


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def stacked(n: int, tree):
    """Give every spec in `tree` a leading "layers" axis of size n (for scanned layers)."""
    return jax.tree.map(lambda s: ParamSpec((n, *s.shape), ("layers", *s.axes), s.init), tree, is_leaf=is_spec)


def dense(d_in: int, d_out: int, in_axis: str, out_axis: str, bias: bool = True, std: float | None = None) -> dict:
    """A linear layer; random init is LeCun normal (std 1/sqrt(d_in)) so tiny models train from scratch quickly
    (released models always load their weights)."""
    out = {"kernel": ParamSpec((d_in, d_out), (in_axis, out_axis), normal(d_in**-0.5 if std is None else std))}
    if bias:
        out["bias"] = ParamSpec((d_out,), (out_axis,), zeros)
    return out


def init_params(specs, key: jax.Array, dtype=jnp.float32):
    """Random parameters for a spec tree (one independent key per leaf)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [s.init(k, s.shape, dtype) for s, k in zip(leaves, keys)])


def logical_axes(specs):
    return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def abstract_params(specs, dtype=jnp.float32):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def check_shapes(specs, params, where: str = "params") -> None:
    """Raise a KeyError/ValueError naming the first parameter whose presence or shape disagrees with the specs."""
    spec_flat = flatten_paths(specs)
    got_flat = flatten_paths(params)
    missing = sorted(set(spec_flat) - set(got_flat))
    unexpected = sorted(set(got_flat) - set(spec_flat))
    if missing or unexpected:
        raise KeyError(f"{where}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for path, spec in spec_flat.items():
        if tuple(got_flat[path].shape) != spec.shape:
            raise ValueError(f"{where}: {path} has shape {tuple(got_flat[path].shape)}, config expects {spec.shape}")
