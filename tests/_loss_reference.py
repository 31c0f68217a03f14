"""Whole-batch loss reductions the tests compare against references (torch, the unchunked loss); the library
computes per-row sums (`losses.lm_row_sums`, `losses.chunked_lm_row_sums`, `losses.vision_supervision_rows`) and
reduces them in `losses.compute_losses`, so these means live here, beside the tests that read them."""

import jax
import jax.numpy as jnp

from llavaction_jax.losses import chunked_lm_row_sums, lm_row_sums, masked_mean, vision_supervision_rows


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean CE of logits[:, t] against labels[:, t + 1] over non-ignored targets of the whole batch (0 for a batch
    without targets, where torch gives NaN)."""
    total, count = lm_row_sums(logits, labels)
    return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)


def chunked_lm_loss(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int, skip_empty: bool = True) -> jax.Array:
    """`lm_loss(logits_fn(hidden), labels)` through `chunked_lm_row_sums` (no (B, S, vocab) logits)."""
    total, count = chunked_lm_row_sums(hidden, labels, logits_fn, chunk, skip_empty)
    return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)


def vision_supervision_loss(heads: dict, gathered: jax.Array, actions: jax.Array, *, vision_token_training: str,
                            three_tokens: bool) -> jax.Array:
    """Upstream's aux loss of one device batch before its final 0.1 weight: sum over selected layers of
    0.5 CE(verb) + 0.5 CE(noun) + 0.1 CE(action), each a mean over rows with action id >= 0, divided by
    (number of layers + 1); 0 when no row has labels (upstream: 0 x the logits)."""
    rows = vision_supervision_rows(heads, gathered, actions, vision_token_training=vision_token_training,
                                   three_tokens=three_tokens)
    return masked_mean(rows, actions[:, 0] >= 0)
