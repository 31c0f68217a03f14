"""The training losses, apart from the model: LM cross-entropy and the vision-supervision auxiliary loss
(`llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM.forward`). The train step and the public API both
call `compute_losses` on the model's `ModelOutput`.

Two reductions (`train.loss_reduction`):

- "sample" (upstream's recipe: one sample per device, the loss averaged over devices): each sample's loss is its
  own token-mean LM loss + 0.1 x its own aux loss, and the batch loss is the mean over samples, so a 20-token answer
  weighs as much as a 300-token caption. The divisor is the number of samples *with at least one LM target*
  (`count_samples`), taken over the whole global batch by the train step; a row without targets (a padding row
  that fills the last batch, or a sample whose answer was cut by truncation) weighs nothing in either loss.
  Upstream has no rule there (its CE of an empty sample is NaN); zero weight keeps padding rows out of the mean.
- "token": the token mean over the whole (micro-)batch, and the aux loss averaged over the rows with action
  labels: upstream's formula for a device batch of several samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import llava
from llavaction_jax.model.layers import token_nll
from llavaction_jax.model.llava import IGNORE_INDEX

REDUCTIONS = ("sample", "token")
VERB_WEIGHT, NOUN_WEIGHT, ACTION_WEIGHT = 0.5, 0.5, 0.1
AUX_LOSS_WEIGHT = 0.1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Losses:
    loss: jax.Array  # lm_loss + AUX_LOSS_WEIGHT * aux_loss
    lm_loss: jax.Array
    aux_loss: jax.Array  # the vision-supervision loss before its weight; 0 without heads, video or action labels
    targets: jax.Array  # LM target tokens the loss averaged over


def compute_losses(params: dict, cfg: ModelConfig, execution: ResolvedExecution, out: llava.ModelOutput,
                   actions: jax.Array | None = None, *, logits: jax.Array | None = None, reduction: str = "token",
                   num_samples: jax.Array | None = None) -> Losses:
    """Losses of a forward pass under `reduction` (module docstring). With `logits` (the API, which returns them
    anyway) the LM loss reads them; without, it computes them from `out.hidden`: in chunks of
    `execution.loss_chunk_tokens` positions (never the whole (B, S, vocab) array) unless that is 0 or
    `execution.loop_collectives` is "off". `num_samples` ("sample" only): the divisor, by default this batch's
    `count_samples`; the train step passes the global batch's so that micro-batch losses add up to its mean."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r}; expected one of {REDUCTIONS}")
    execution = require_resolved(execution, "losses.compute_losses")
    logits_fn = lambda states: llava.lm_logits(params, states)
    if logits is not None:
        total, count = lm_row_sums(logits, out.labels)
    elif execution.loss_chunk_tokens > 0 and execution.loop_collectives != "off":
        total, count = chunked_lm_row_sums(out.hidden, out.labels, logits_fn, execution.loss_chunk_tokens,
                                           execution.loss_skip_empty_chunks)
    else:
        total, count = lm_row_sums(logits_fn(out.hidden), out.labels)
    has_target = count > 0
    aux_rows = None
    if out.action_states is not None and actions is not None:
        aux_rows = vision_supervision_rows(params["heads"], out.action_states, actions,
                                           vision_token_training=cfg.vision_token_training,
                                           three_tokens=cfg.vision_supervision == "three_tokens")
    if reduction == "token":
        lm = jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)
        aux = jnp.zeros((), jnp.float32) if aux_rows is None else masked_mean(aux_rows, actions[:, 0] >= 0)
    else:
        n = count_samples(out.labels) if num_samples is None else num_samples
        n = jnp.maximum(n, 1).astype(jnp.float32)
        lm = jnp.sum(jnp.where(has_target, total / jnp.maximum(count, 1), 0.0)) / n
        aux = (jnp.zeros((), jnp.float32) if aux_rows is None
               else jnp.sum(jnp.where(has_target & (actions[:, 0] >= 0), aux_rows, 0.0)) / n)
    return Losses(loss=lm + AUX_LOSS_WEIGHT * aux, lm_loss=lm, aux_loss=aux,
                  targets=jnp.sum(count).astype(jnp.float32))


def count_samples(labels: jax.Array) -> jax.Array:
    """Rows of `labels` (the model's, or the tokenizer's: either has a target per answer token) with a target."""
    return jnp.sum(jnp.any(labels[:, 1:] != IGNORE_INDEX, axis=1))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def lm_row_sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the CE sum of logits[:, t] against labels[:, t + 1] over non-ignored targets, and their count."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    nll = token_nll(logits[:, :-1], targets)
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=1), jnp.sum(valid, axis=1)


def chunked_lm_row_sums(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int, skip_empty: bool = True):
    """`lm_row_sums(logits_fn(hidden), labels)` without materialising the (B, S, vocab) logits.

    The shifted sequence is cut into (balanced) chunks of at most `chunk` positions; a `lax.scan` computes each
    chunk's logits and CE and keeps only the per-row sums, and `jax.checkpoint` makes the backward recompute a
    chunk's logits instead of saving them. A chunk with no target in any row (visual tokens, prompts, padding: most
    of a LLaVA sequence) is skipped with `lax.cond`, forward and backward, since it adds nothing to the loss or its
    gradient. For a 64-frame 7B sample (16k positions, ~100 targets, 152k vocab) that leaves a chunk or two of
    logits instead of three 9.3 GiB fp32 copies. Equal to `lm_row_sums` up to summation order. `skip_empty=False`
    keeps every chunk (no conditional)."""
    b, s, h = hidden.shape
    n = s - 1
    num = -(-n // chunk)
    if num == 1:  # one chunk: a checkpointed chunk would only recompute it
        return lm_row_sums(logits_fn(hidden), labels)
    chunk = -(-n // num)  # balanced: 884 positions at 256 are 4 chunks of 221, not 3 x 256 + 116
    pad = num * chunk - n
    states = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    states = states.reshape(b, num, chunk, h).swapaxes(0, 1)
    targets = targets.reshape(b, num, chunk).swapaxes(0, 1)
    zero = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32))

    def chunk_ce(states, targets):
        valid = targets != IGNORE_INDEX
        nll = token_nll(logits_fn(states), targets)
        return jnp.sum(jnp.where(valid, nll, 0.0), axis=1), jnp.sum(valid, axis=1).astype(jnp.int32)

    # The checkpoint wraps the conditional too: its backward then keeps only the chunk's inputs and recomputes the
    # branch. A checkpoint inside the branch is not enough: the conditional's own backward saved every chunk's
    # logits (f32[chunks, chunk, vocab], 16 GiB at 7B / 16k tokens in bench.memory_7b).
    @jax.checkpoint
    def chunk_sums(states, targets):
        if skip_empty:
            return jax.lax.cond(jnp.any(targets != IGNORE_INDEX), chunk_ce, lambda *_: zero, states, targets)
        return chunk_ce(states, targets)

    def body(carry, xs):
        total, count = chunk_sums(*xs)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, zero, (states, targets))
    return total, count


def select_layers(gathered: jax.Array, vision_token_training: str) -> jax.Array:
    """Which entries of the (L + 1)-long hidden-state stack feed the heads."""
    if vision_token_training == "last_layer":
        return gathered[-1:]
    if vision_token_training == "first_layer":
        return gathered[:1]
    return gathered  # "all_layers" (and upstream's other values) use every entry


def vision_supervision_rows(heads: dict, gathered: jax.Array, actions: jax.Array, *, vision_token_training: str,
                            three_tokens: bool) -> jax.Array:
    """Per row: sum over the selected layers of 0.5 CE(verb) + 0.5 CE(noun) + 0.1 CE(action), divided by
    (number of layers + 1), upstream's per-sample aux loss before its 0.1 weight. Rows without labels
    ([-1, -1, -1]) give meaningless values: the reductions mask them."""
    layers = select_layers(gathered, vision_token_training)
    verb, noun, action = llava.head_logits(heads, layers, three_tokens)  # each (n_layers, B, classes)
    safe = jnp.maximum(actions, 0)
    per_layer = (VERB_WEIGHT * token_nll(verb, safe[:, 0]) + NOUN_WEIGHT * token_nll(noun, safe[:, 1])
                 + ACTION_WEIGHT * token_nll(action, safe[:, 2]))  # (n_layers, B)
    return jnp.sum(per_layer, axis=0) / (layers.shape[0] + 1)

