"""Decoding beside the model: one prefill of the prompts (video spliced in) into a KV cache, then batched
generation in a `lax.while_loop`, or option scoring as continuations of the prompts.

Generation. Upstream answers one question at a time with HF `generate` (greedy, `max_new_tokens=4096`, stop at
EOS). Here a whole batch of prompts of different lengths decodes together: prompts are right-padded after
splicing, so a token's cache index equals its position and each row continues at its own length. Rows that hit EOS
keep emitting the pad id until every row is done or the budget is spent. The KV cache holds exactly the positions
the call can write (the padded prompt, then `max_new_tokens - 1` generated tokens: the last one is never fed back),
and the loop carries a named `DecodeState`.

Option scoring (beyond upstream, which only generates and parses: llavaction/action/llava_inference.py:
llava_inference, llavaction/action/ek_eval.py: process_raw_pred) asks the model how likely it is to answer with
each option, exactly as it was trained to answer: the assistant turn of an EK100 MQA training sample is
``"{letter}. {answer}"`` followed by ``<|im_end|>`` (llavaction/action/generate_description.py,
llavaction/train/train.py: preprocess_qwen), so the scored continuation of option ``"C. open door"`` is those
tokens then ``<|im_end|>``, right after the prompt (data/option_tokens.py). Including ``<|im_end|>`` scores
"this exact answer, then stop", so an option that is a prefix of another is not favoured for free. The options
continue the prompt's cache: row b*C + c continues question b with option c, written at the prompt's length, so
RoPE positions and the causal mask are those of the single sequence prompt + option. The answer is the option with
the highest total log-probability (``logprob_sum``); ``logprob_mean`` (per token) is reported beside it.

These functions are traced by the entry points' jitted steps (api.py); `execution` must be resolved for the mesh
(config.require_resolved).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import llava, qwen2
from llavaction_jax.model.layers import token_nll

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
class Prefill:
    """The prompts run through the decoder once."""

    last: jax.Array  # (B, H) final normed hidden state of each prompt's last token: it predicts the next token
    cache: qwen2.KVCache  # the prompts' keys and values at indices 0..S-1, room for `extra` positions after
    lengths: jax.Array  # (B,) int32 prompt lengths, video spliced in


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The `lax.while_loop` carry: `step` tokens of every row are in `tokens`; token `step - 1` is fed next."""

    step: jax.Array  # () int32
    tokens: jax.Array  # (B, max_new_tokens) int32, pad after EOS and past `step`
    cache: qwen2.KVCache
    done: jax.Array  # (B,) bool: the row has emitted an EOS
    key: jax.Array  # PRNG key for sampling


def decoder_step(params: dict, execution: ResolvedExecution, cfg: ModelConfig):
    """`(x (B, T, H), write_pos (B,), cache) -> (hidden, cache)`: the decoder over tokens continuing the cache."""
    return functools.partial(qwen2.forward_cached, params["text"], cfg=cfg.text, attn_impl=execution.attention,
                             platform=execution.platform)


def prefill(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values, attention_mask,
            extra: int, out_len: int | None = None, num_frames=None) -> Prefill:
    """Splice the videos into the prompts and run them through the decoder into a cache with room for `extra`
    positions after the longest prompt. input_ids (B, L) with one -200 each, right-padded (``attention_mask``
    marks real tokens); pixel_values (B, T, C, H, W) or None; num_frames (B,): row i's video is its first
    num_frames[i] frames (default: all T)."""
    execution = require_resolved(execution, "decode.prefill")
    s = llava.embed_inputs(params, cfg, execution, input_ids, pixel_values, attention_mask, out_len=out_len,
                           num_frames=num_frames)
    b, s_len = s.valid.shape
    lengths = s.valid.sum(axis=1).astype(jnp.int32)
    cache = qwen2.init_cache(cfg.text, b, s_len + extra, s.embeds.dtype)
    # an empty cache: attention over the prompts' own keys (qwen2.forward_cached, the fused kernels' form)
    h, cache = decoder_step(params, execution, cfg)(s.embeds, jnp.zeros((b,), jnp.int32), cache, prefill=True)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return Prefill(last=last, cache=cache, lengths=lengths)


def generate(params: dict, cfg: ModelConfig, execution: ResolvedExecution, gen: GenerationConfig, input_ids,
             pixel_values, attention_mask, key: jax.Array | None = None, out_len: int | None = None,
             num_frames=None):
    """Returns (tokens (B, max_new_tokens) int32 with pad after EOS, num_tokens (B,) including the EOS).
    Inputs as `prefill` takes them."""
    execution = require_resolved(execution, "decode.generate")
    p = prefill(params, cfg, execution, input_ids, pixel_values, attention_mask, gen.max_new_tokens - 1, out_len,
                num_frames)
    text, dtype, b = params["text"], p.cache.k.dtype, p.lengths.shape[0]
    decode = decoder_step(params, execution, cfg)
    key = jax.random.key(0) if key is None else key
    eos = jnp.asarray(gen.eos_ids, jnp.int32)
    key, sub = jax.random.split(key)
    first = select_token(qwen2.lm_head(text, p.last, gen.vocab_limit), gen, sub)
    tokens = jnp.full((b, gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state: DecodeState):
        return (state.step < gen.max_new_tokens) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        prev = state.tokens[:, state.step - 1]
        h, cache = decode(qwen2.embed(text, prev, dtype)[:, None], p.lengths + state.step - 1, state.cache)
        key, sub = jax.random.split(state.key)
        nxt = select_token(qwen2.lm_head(text, h[:, 0], gen.vocab_limit), gen, sub)
        nxt = jnp.where(state.done, gen.pad_id, nxt)
        return DecodeState(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(nxt), cache=cache,
                           done=state.done | jnp.isin(nxt, eos), key=key)

    final = jax.lax.while_loop(cond, body, DecodeState(jnp.int32(1), tokens, p.cache, jnp.isin(first, eos), key))
    is_eos = jnp.isin(final.tokens, eos)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, gen.max_new_tokens)
    return final.tokens, first_eos


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] in fp32: the negated per-position cross-entropy of the losses."""
    return -token_nll(logits, targets)


def score_options(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values,
                  attention_mask, option_ids, option_mask, out_len: int | None = None, vocab_limit: int | None = None,
                  options_per_pass: int | None = None, num_frames=None) -> dict:
    """Log-likelihood of each option continuation (module docstring).

    Prompts as `prefill` takes them; option_ids / option_mask (B, K, M) from data/option_tokens.pad_options;
    ``options_per_pass`` C (a divisor of K; default K) options share one pass over the prompts' cache (the cache is
    copied C times, so fewer trade passes for memory: a 16-frame 7B prompt's cache is ~0.2 GB, a 64-frame one
    ~0.8 GB). Returns {"token_logprobs" (B, K, M) (0 at padding), "logprob_sum" (B, K), "logprob_mean" (B, K),
    "num_tokens" (B, K)}; options without tokens score -inf.
    """
    execution = require_resolved(execution, "decode.score_options")
    k, m = option_ids.shape[1:]
    c = options_per_pass or k
    if k % c:
        raise ValueError(f"options_per_pass={c} does not divide the {k} options")
    p = prefill(params, cfg, execution, input_ids, pixel_values, attention_mask, m, out_len, num_frames)
    text, dtype, b = params["text"], p.cache.k.dtype, p.lengths.shape[0]
    decode = decoder_step(params, execution, cfg)
    # lm_head is always given (B, T, H): its sharding constraint names three axes.
    first = token_logprobs(qwen2.lm_head(text, p.last[:, None], vocab_limit), option_ids[:, :, 0])  # (B, K)

    def score_chunk(_, ids):  # ids (B, C, M): C options of every question, each continuing its prompt's cache
        x = qwen2.embed(text, ids.reshape(b * c, m), dtype)
        h, _ = decode(x, jnp.repeat(p.lengths, c), p.cache.repeat_rows(c))  # row b*C + j continues question b
        lp = token_logprobs(qwen2.lm_head(text, h[:, :-1], vocab_limit), ids.reshape(b * c, m)[:, 1:])
        return None, lp.reshape(b, c, m - 1)  # token j's hidden state predicts token j + 1

    chunks = option_ids.reshape(b, k // c, c, m).transpose(1, 0, 2, 3)
    # (K/C, B, C, M-1); unrolled where sharded work must not sit inside a loop (ExecutionConfig.resolve)
    _, rest = jax.lax.scan(score_chunk, None, chunks, unroll=execution.loop_collectives == "off")
    rest = rest.transpose(1, 0, 2, 3).reshape(b, k, m - 1)

    token_lp = jnp.where(option_mask, jnp.concatenate([first[..., None], rest], axis=-1), 0.0)
    num_tokens = option_mask.sum(axis=-1)
    total = jnp.where(num_tokens > 0, token_lp.sum(axis=-1), -jnp.inf)
    return {"token_logprobs": token_lp, "logprob_sum": total,
            "logprob_mean": total / jnp.maximum(num_tokens, 1), "num_tokens": num_tokens}
