"""Small building blocks shared by the vision tower, the decoder, the losses and decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llavaction_jax.config import REMAT_POLICIES


def linear(p: dict, x: jax.Array) -> jax.Array:
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with fp32 statistics, affine scale and bias (SigLIP)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: statistics in fp32, cast back, then the learned scale (transformers' order)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return p["scale"].astype(x.dtype) * y.astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def remat(fn, policy: str):
    """Wrap a scanned layer body with the configured rematerialisation policy."""
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if policy not in policies:
        raise ValueError(f"remat_policy {policy!r} is not one of {REMAT_POLICIES}")
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position CE, logsumexp(logits) - logits[target], in fp32; the target logit picked with a
    compare-and-select rather than a gather: the gather's backward is a scatter into a (tokens, vocab) array, which
    cost XLA:CPU 0.5 s of a 1.5 s lm_head + CE step at 1770 tokens x 32k vocab; the select's backward fuses with
    the softmax."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked
