"""Nested dicts of parameters (or their specs, shardings, shapes) as flat {"a/b/c": leaf} maps and back.

Parameter trees are plain nested dicts; the converter, the optimizer's groups and the sharding helpers address a
leaf by its slash-joined path. This module imports nothing of the package, so any room may use it.
"""

from __future__ import annotations

from typing import Any, Iterator


def iter_paths(tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("a/b/c", leaf) for every leaf of a nested dict, in insertion order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_paths(v, f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, tree


def flatten_paths(tree) -> dict:
    """{"a/b/c": leaf} for a nested dict."""
    return dict(iter_paths(tree))


def unflatten_paths(flat: dict) -> dict:
    """The nested dict of a {"a/b/c": leaf} map (inverse of `flatten_paths`)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out
