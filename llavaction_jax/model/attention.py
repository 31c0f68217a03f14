"""Scaled dot-product attention with grouped KV heads, fp32 softmax (as upstream), one interface for all kernels.

q: (B, T, N, D); k, v: (B, S, K, D) with N a multiple of K (GQA); mask: bool, broadcastable to (B, 1, T, S),
True where a query may attend. Returns (B, T, N, D) in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def attention(q, k, v, mask=None, *, impl: str = "xla"):
    if impl != "xla":
        raise ValueError(f"attention implementation {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def causal_mask(query_pos, key_pos, key_valid=None):
    """(B, 1, T, S) bool: key position <= query position, and the key is a real (non-padding) token."""
    mask = key_pos[:, None, None, :] <= query_pos[:, None, :, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask
