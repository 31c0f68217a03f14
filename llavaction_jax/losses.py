"""The training losses, apart from the model: LM cross-entropy and the vision-supervision auxiliary loss
(`llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM.forward`). The train step and the public API both
call `compute_losses` on the model's `ModelOutput`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig
from llavaction_jax.model import llava
from llavaction_jax.model.llava import IGNORE_INDEX

VERB_WEIGHT, NOUN_WEIGHT, ACTION_WEIGHT = 0.5, 0.5, 0.1
AUX_LOSS_WEIGHT = 0.1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Losses:
    loss: jax.Array  # lm_loss + AUX_LOSS_WEIGHT * aux_loss
    lm_loss: jax.Array
    aux_loss: jax.Array  # the vision-supervision loss before its weight; 0 without heads, video or action labels
    targets: jax.Array  # LM target tokens the loss averaged over


def compute_losses(params: dict, cfg: ModelConfig, out: llava.ModelOutput, actions: jax.Array | None = None, *,
                   logits: jax.Array | None = None) -> Losses:
    """Losses of a forward pass. With `logits` (the API, which returns them anyway) the LM loss reads them;
    without, it computes them from `out.hidden`: in chunks of `cfg.loss_chunk_tokens` positions (never the whole
    (B, S, vocab) array) unless that is 0 or `cfg.loop_collectives` is "off"."""
    targets = out.labels[:, 1:] != IGNORE_INDEX
    logits_fn = lambda states: llava.lm_logits(params, states)
    if logits is not None:
        lm = lm_loss(logits, out.labels)
    elif cfg.loss_chunk_tokens > 0 and cfg.loop_collectives != "off":
        lm = chunked_lm_loss(out.hidden, out.labels, logits_fn, cfg.loss_chunk_tokens, cfg.loss_skip_empty_chunks)
    else:
        lm = lm_loss(logits_fn(out.hidden), out.labels)
    aux = jnp.zeros((), jnp.float32)
    if out.action_states is not None and actions is not None:
        aux = vision_supervision_loss(params["heads"], out.action_states, actions,
                                      vision_token_training=cfg.vision_token_training,
                                      three_tokens=cfg.vision_supervision == "three_tokens")
    return Losses(loss=lm + AUX_LOSS_WEIGHT * aux, lm_loss=lm, aux_loss=aux,
                  targets=jnp.sum(targets).astype(jnp.float32))


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


def chunked_lm_loss(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int, skip_empty: bool = True) -> jax.Array:
    """`lm_loss(logits_fn(hidden), labels)` without materialising the (B, S, vocab) logits.

    The shifted sequence is cut into (balanced) chunks of at most `chunk` positions; a `lax.scan` computes each
    chunk's logits and CE and keeps only the sums, and `jax.checkpoint` makes the backward recompute a chunk's
    logits instead of saving them. A chunk with no target in any row (visual tokens, prompts, padding: most of a
    LLaVA sequence) is skipped with `lax.cond`, forward and backward, since it adds nothing to the loss or its
    gradient. For a 64-frame 7B sample (16k positions, ~100 targets, 152k vocab) that leaves a chunk or two of
    logits instead of three 9.3 GiB fp32 copies. Equal to `lm_loss` up to summation order. `skip_empty=False`
    keeps every chunk (no conditional)."""
    b, s, h = hidden.shape
    n = s - 1
    num = -(-n // chunk)
    if num == 1:  # one chunk: a checkpointed chunk would only recompute it
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


def vision_supervision_loss(heads: dict, gathered: jax.Array, actions: jax.Array, *, vision_token_training: str,
                            three_tokens: bool) -> jax.Array:
    """Upstream's aux loss before its final 0.1 weight: sum over selected layers of
    0.5 CE(verb) + 0.5 CE(noun) + 0.1 CE(action), each a mean over rows with action id >= 0, divided by
    (number of layers + 1). Rows without labels carry [-1, -1, -1] and are dropped."""
    layers = select_layers(gathered, vision_token_training)
    verb, noun, action = llava.head_logits(heads, layers, three_tokens)  # each (n_layers, B, classes)
    valid = actions[:, 0] >= 0
    n_valid = jnp.maximum(jnp.sum(valid), 1)

    def summed_layer_means(logits, targets):  # sum over layers of the mean CE over valid rows
        total, _ = cross_entropy(logits, jnp.broadcast_to(targets, logits.shape[:2]), jnp.broadcast_to(valid, logits.shape[:2]))
        return total / n_valid

    loss = (VERB_WEIGHT * summed_layer_means(verb, actions[:, 0]) + NOUN_WEIGHT * summed_layer_means(noun, actions[:, 1])
            + ACTION_WEIGHT * summed_layer_means(action, actions[:, 2]))
    return loss / (layers.shape[0] + 1)
