"""Batched generation: one prefill, then KV-cache decoding in a single jitted `lax.while_loop`.

Upstream answers one question at a time with HF `generate` (greedy, `max_new_tokens=4096`, stop at EOS). Here a
whole batch of prompts of different lengths decodes together: prompts are right-padded after splicing, so a
token's cache index equals its position and each row continues at its own length. Rows that hit EOS keep
emitting the pad id until every row is done or the budget is spent. The KV cache holds exactly the positions
the call can write (the padded prompt, then `max_new_tokens - 1` generated tokens: the last one is never fed
back), and the loop carries a named `DecodeState`.

`cfg` is used as given: entry points (the API, eval, benchmarks) pass a config resolved for their mesh
(`sharding.resolve_config`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig
from llavaction_jax.model import llava, qwen2

QWEN_IM_END, QWEN_ENDOFTEXT = 151645, 151643


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 4096  # upstream's value (ek_eval / llava_inference)
    eos_ids: tuple[int, ...] = (QWEN_IM_END, QWEN_ENDOFTEXT)
    pad_id: int = QWEN_ENDOFTEXT
    temperature: float = 0.0  # 0 = greedy, as upstream
    top_p: float = 1.0
    # Slice logits to len(tokenizer), as upstream's resize at load (llavaction/model/builder.py: load_pretrained_model).
    vocab_limit: int | None = None


def select_token(logits: jax.Array, gen: GenerationConfig, key: jax.Array | None) -> jax.Array:
    """(B, V) fp32 logits -> (B,) ids: argmax (first maximum, like torch) or temperature / nucleus sampling."""
    if gen.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / gen.temperature
    if gen.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_idx = jnp.sum(cum < gen.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The `lax.while_loop` carry: `step` tokens of every row are in `tokens`; token `step - 1` is fed next."""

    step: jax.Array  # () int32
    tokens: jax.Array  # (B, max_new_tokens) int32, pad after EOS and past `step`
    cache: qwen2.KVCache
    done: jax.Array  # (B,) bool: the row has emitted an EOS
    key: jax.Array  # PRNG key for sampling


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "out_len"))
def generate(params: dict, cfg: ModelConfig, gen: GenerationConfig, input_ids, pixel_values, attention_mask,
             key: jax.Array | None = None, out_len: int | None = None, num_frames=None):
    """Returns (tokens (B, max_new_tokens) int32 with pad after EOS, num_tokens (B,) including the EOS).
    num_frames (B,) int: row i's video is its first num_frames[i] frames of pixel_values (default: all T)."""
    s = llava.embed_inputs(params, cfg, input_ids, pixel_values, attention_mask, out_len=out_len,
                           num_frames=num_frames)
    text = params["text"]
    b, s_len = s.valid.shape
    lengths = s.valid.sum(axis=1).astype(jnp.int32)
    key = jax.random.key(0) if key is None else key
    eos = jnp.asarray(gen.eos_ids, jnp.int32)

    cache = qwen2.init_cache(cfg.text, b, s_len + gen.max_new_tokens - 1, s.embeds.dtype)
    decode = functools.partial(qwen2.forward_cached, text, cfg=cfg.text, attn_impl=cfg.attention,
                               platform=cfg.platform)
    h, cache = decode(s.embeds, jnp.zeros((b,), jnp.int32), cache, prefill=True)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first = select_token(qwen2.lm_head(text, last, gen.vocab_limit), gen, sub)
    tokens = jnp.full((b, gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state: DecodeState):
        return (state.step < gen.max_new_tokens) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        prev = state.tokens[:, state.step - 1]
        h, cache = decode(qwen2.embed(text, prev, s.embeds.dtype)[:, None], lengths + state.step - 1, state.cache)
        key, sub = jax.random.split(state.key)
        nxt = select_token(qwen2.lm_head(text, h[:, 0], gen.vocab_limit), gen, sub)
        nxt = jnp.where(state.done, gen.pad_id, nxt)
        return DecodeState(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(nxt), cache=cache,
                           done=state.done | jnp.isin(nxt, eos), key=key)

    final = jax.lax.while_loop(cond, body, DecodeState(jnp.int32(1), tokens, cache, jnp.isin(first, eos), key))
    is_eos = jnp.isin(final.tokens, eos)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, gen.max_new_tokens)
    return final.tokens, first_eos
