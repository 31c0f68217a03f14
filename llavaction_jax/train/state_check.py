"""Facts about a train state computed on the devices when a checkpoint is saved, and stored in its metadata: whether
every value is finite, and a digest of every array's bits.

They let a resume check what it restores without trusting the files: a checkpoint whose state was not finite is
never a "last good" one (the NaN stop) and is not resumed from; one that lost its seal (`checksums.json`, written
once the save is complete, train/checkpoint.py) is read back in full and compared with the digest saved with it,
so a flipped bit is caught even where the files themselves cannot be checked.

Digest of an array: its elements' bits as uint32 (wider types in 32-bit words), each multiplied by an odd weight
(2 x flat index + 1), summed modulo 2^32. Integer addition is exact and associative, so the sum does not depend on
how the array is sharded or in which order devices add, and a change of any one element always changes it (odd
weights are invertible modulo 2^32). It detects corruption, it is not a cryptographic hash.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _as_words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (last axis of 2 for 64-bit types)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    words = _as_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat index, built from iotas so no reshape moves shards
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


@jax.jit
def _summarize(state):
    leaves = jax.tree.leaves(state)
    finite = functools.reduce(jnp.logical_and, [_finite(x) for x in leaves], jnp.asarray(True))
    return finite, jax.tree.map(_digest, state)


def summarize(state) -> dict:
    """{"finite": bool, "digest": {"params/...": int}} of a train state (a pytree of arrays, sharded or not)."""
    finite, digests = jax.device_get(_summarize(state))
    flat = jax.tree_util.tree_leaves_with_path(digests)
    return {"finite": bool(finite),
            "digest": {jax.tree_util.keystr(path, simple=True, separator="/"): int(np.asarray(d)) for path, d in flat}}


def problem(saved: dict | None, state) -> str | None:
    """Why the restored `state` is not the one saved (its digest or finiteness differs), None when it is. Without
    saved facts (checkpoints older than them) only finiteness is checked."""
    now = summarize(state)
    if saved and saved.get("digest"):
        differ = [k for k in sorted(set(saved["digest"]) | set(now["digest"]))
                  if saved["digest"].get(k) != now["digest"].get(k)]
        if differ:
            return (f"{len(differ)} array(s) read back differ from the digest saved with them (first: {differ[0]}): "
                    "the files are corrupt")
    if not now["finite"]:
        return "its state holds NaN or Inf values"
    return None
