"""LM loss and the vision-supervision auxiliary loss (upstream-spec.md 1.8, `llava_qwen.py:213-277`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llavaction_jax.sharding import active_mesh_size

IGNORE_INDEX = -100
VERB_WEIGHT, NOUN_WEIGHT, ACTION_WEIGHT = 0.5, 0.5, 0.1
AUX_LOSS_WEIGHT = 0.1
CPU_MESH_FALLBACK = True  # chunked_lm_loss: the plain loss on multi-device CPU meshes (see there)


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array):
    """Sum of per-row CE over `valid` rows and the number of those rows (fp32).

    nll = logsumexp(logits) - logits[target], the target logit picked with a compare-and-select rather than a
    gather: the gather's backward is a scatter into a (tokens, vocab) array, which cost XLA:CPU 0.5 s of a 1.5 s
    lm_head + CE step at 1770 tokens x 32k vocab; the select's backward fuses with the softmax."""
    logits = logits.astype(jnp.float32)
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean CE of logits[:, t] against labels[:, t + 1] over non-ignored targets of the whole batch.

    Deviation: a batch with no target gives 0 instead of torch's NaN, so a fully masked batch cannot poison a run.
    """
    targets = labels[:, 1:]
    total, count = cross_entropy(logits[:, :-1], targets, targets != IGNORE_INDEX)
    return total / jnp.maximum(count, 1)


def chunked_lm_loss(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int,
                    skip_empty: bool | None = None) -> jax.Array:
    """`lm_loss(logits_fn(hidden), labels)` without materialising the (B, S, vocab) logits.

    The shifted sequence is cut into (balanced) chunks of at most `chunk` positions; a `lax.scan` computes each
    chunk's logits and CE and keeps only the sums, and `jax.checkpoint` makes the backward recompute a chunk's
    logits instead of saving them. A chunk with no target in any row (visual tokens, prompts, padding: most of a
    LLaVA sequence) is skipped with `lax.cond`, forward and backward, since it adds nothing to the loss or its
    gradient. For a 64-frame 7B sample (16k positions, ~100 targets, 152k vocab) that leaves a chunk or two of
    logits instead of three 9.3 GiB fp32 copies. Equal to `lm_loss` up to summation order.

    On a multi-device CPU mesh (tests, fake devices) this is the plain `lm_loss`: XLA:CPU can order collectives
    inside loops and conditionals differently on different devices or processes and deadlock (the 2-process and
    8-device tests hung with it). Memory is not the constraint there; `bench.memory_7b`, which compiles for
    accelerator-like use without running, turns `CPU_MESH_FALLBACK` off. `skip_empty=False` keeps every chunk."""
    b, s, h = hidden.shape
    n = s - 1
    num = -(-n // chunk)
    cpu_mesh = jax.default_backend() == "cpu" and active_mesh_size() > 1
    if num == 1 or (cpu_mesh and CPU_MESH_FALLBACK):  # one chunk: a checkpointed chunk would only recompute it
        return lm_loss(logits_fn(hidden), labels)
    chunk = -(-n // num)  # balanced: 884 positions at 256 are 4 chunks of 221, not 3 x 256 + 116
    pad = num * chunk - n
    states = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    states = states.reshape(b, num, chunk, h).swapaxes(0, 1)
    targets = targets.reshape(b, num, chunk).swapaxes(0, 1)
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    @jax.checkpoint
    def chunk_ce(states, targets):
        return cross_entropy(logits_fn(states), targets, targets != IGNORE_INDEX)

    if skip_empty is None:
        skip_empty = not cpu_mesh

    def body(carry, xs):
        states, targets = xs
        if skip_empty:
            total, count = jax.lax.cond(jnp.any(targets != IGNORE_INDEX), chunk_ce, lambda *_: zero, states, targets)
        else:
            total, count = chunk_ce(states, targets)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, zero, (states, targets))
    return total / jnp.maximum(count, 1)


def select_layers(gathered: jax.Array, vision_token_training: str) -> jax.Array:
    """Which entries of the (L + 1)-long hidden-state stack feed the heads."""
    if vision_token_training == "last_layer":
        return gathered[-1:]
    if vision_token_training == "first_layer":
        return gathered[:1]
    return gathered  # "all_layers" (and upstream's other values) use every entry


def head_logits(heads: dict, states: jax.Array, three_tokens: bool):
    """states (..., P, H) at the action positions -> (verb, noun, action) logits in fp32.

    one_token / newline: every head reads position 0; three_tokens: verb 0, noun 1, action 2.
    """
    pos = (0, 1, 2) if three_tokens else (0, 0, 0)
    out = []
    for name, i in zip(("verb", "noun", "action"), pos):
        out.append((states[..., i, :] @ heads[name]["kernel"].astype(states.dtype)).astype(jnp.float32))
    return tuple(out)


def vision_supervision_loss(heads: dict, gathered: jax.Array, actions: jax.Array, *, vision_token_training: str,
                            three_tokens: bool) -> jax.Array:
    """Upstream's aux loss before its final 0.1 weight: sum over selected layers of
    0.5 CE(verb) + 0.5 CE(noun) + 0.1 CE(action), each a mean over rows with action id >= 0, divided by
    (number of layers + 1). Rows without labels carry [-1, -1, -1] and are dropped."""
    layers = select_layers(gathered, vision_token_training)
    verb, noun, action = head_logits(heads, layers, three_tokens)  # each (n_layers, B, classes)
    valid = actions[:, 0] >= 0
    n_valid = jnp.maximum(jnp.sum(valid), 1)

    def summed_layer_means(logits, targets):  # sum over layers of the mean CE over valid rows
        total, _ = cross_entropy(logits, jnp.broadcast_to(targets, logits.shape[:2]), jnp.broadcast_to(valid, logits.shape[:2]))
        return total / n_valid

    loss = (VERB_WEIGHT * summed_layer_means(verb, actions[:, 0]) + NOUN_WEIGHT * summed_layer_means(noun, actions[:, 1])
            + ACTION_WEIGHT * summed_layer_means(action, actions[:, 2]))
    return loss / (layers.shape[0] + 1)
