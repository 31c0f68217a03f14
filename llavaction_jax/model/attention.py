"""Scaled dot-product attention with grouped KV heads and fp32 softmax (as upstream), one interface for all kernels.

q: (B, T, N, D); k, v: (B, S, K, D) with N a multiple of K (GQA). The mask is described, not materialised, so
blockwise kernels never build a (T, S) array: with `causal`, key j is visible to query i when
k_pos[j] <= q_pos[i]; with `k_valid`, only real (non-padding) keys are visible. Returns (B, T, N, D) in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def attention(q, k, v, *, q_pos=None, k_pos=None, k_valid=None, causal: bool = False, impl: str = "xla"):
    if impl != "xla":
        raise ValueError(f"attention implementation {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    return xla_attention(q, k, v, dense_mask(q_pos, k_pos, k_valid, causal))


def dense_mask(q_pos, k_pos, k_valid, causal: bool):
    """(B, 1, T, S) bool or None: the mask the arguments describe."""
    mask = None
    if causal:
        mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if k_valid is not None:
        valid = k_valid[:, None, None, :]
        mask = valid if mask is None else mask & valid
    return mask


def xla_attention(q, k, v, mask=None):
    """The reference: materialised scores, fp32 softmax."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)
