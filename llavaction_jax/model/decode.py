"""Decoding beside the model: one prefill of the prompts (video spliced in) into a KV cache, then batched
generation in a `lax.while_loop` and option scoring as continuations of the prompts, in one program.

Prefill. The prompts run through the decoder as in training: causal self-attention over their own keys and
values (queries == keys, so `auto` attention takes the fused kernel: cuDNN on GPU, splash on TPU, the tiled
flash kernel on CPU for long prompts), and each layer's keys and values are written into the cache as the layer
scan carries it. Prompts are right-padded after splicing, so a token's cache index equals its position.

Cache. `KVCache` holds (L, B, K, S, D) keys and values: each (layer, row, KV head)'s positions are contiguous, so a
decode step's attention reads a layer's cache as it lies. It is sharded explicitly: rows over the batch axes, KV
heads over `tensor` where they divide (`constrain`). It holds exactly the positions the call can write: the padded
prompt, then `max_new_tokens - 1` generated tokens (the last one is never fed back).

Generation. Upstream answers one question at a time with HF `generate` (greedy, `max_new_tokens=4096`, stop at
EOS). Here a whole batch decodes together, each row continuing at its own length: a decode step writes its token's
keys and values at that row's position of layer i, in place (the cache is carried by the `lax.while_loop` and by
the layer scan inside it, and updated with a scatter at the row's position: no copy of the cache per token), then
attends over the layer's cache up to that position. Rows that hit EOS keep emitting the pad id until every row is
done or the budget is spent. The loop carries a named `DecodeState`.

Option scoring (beyond upstream, which only generates and parses: llavaction/action/llava_inference.py:
llava_inference, llavaction/action/ek_eval.py: process_raw_pred) asks the model how likely it is to answer with
each option, exactly as it was trained to answer: the assistant turn of an EK100 MQA training sample is
``"{letter}. {answer}"`` followed by ``<|im_end|>`` (llavaction/action/generate_description.py,
llavaction/train/train.py: preprocess_qwen), so the scored continuation of option ``"C. open door"`` is those
tokens then ``<|im_end|>``, right after the prompt (data/option_tokens.py). Including ``<|im_end|>`` scores "this
exact answer, then stop", so an option that is a prefix of another is not favoured for free. Every option of a
question continues that question's prompt at the prompt's length (RoPE positions and the causal mask of the single
sequence prompt + option): its tokens attend to the prompt's keys in the prefill cache, read in place (not copied
per option), and causally to the option's own keys; the two partial softmaxes are merged exactly. The answer is
the option with the highest total log-probability (``logprob_sum``); ``logprob_mean`` (per token) is reported
beside it.

`answer` runs the prefill once and both answers from its cache (`eval --mode both`); `generate` and
`score_options` are its two halves. These functions are traced by the entry points' jitted steps (api.py);
`execution` must be resolved for the mesh (config.require_resolved).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import llava, qwen2
from llavaction_jax.model.layers import rms_norm, token_nll
from llavaction_jax.sharding import constrain

QWEN_IM_END, QWEN_ENDOFTEXT = 151645, 151643
CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)  # logical axes of KVCache.k / .v


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


# ---------------------------------------------------------------------------------------------- the cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, (L, B, K, S, D) each (module docstring). Cache index == position."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def constrained(self) -> "KVCache":
        """Rows over the batch axes, KV heads over `tensor` where they divide (a no-op without a mesh)."""
        return KVCache(constrain(self.k, CACHE_AXES), constrain(self.v, CACHE_AXES))

    def layer(self, i) -> tuple[jax.Array, jax.Array]:
        """Layer i's (B, K, S, D) keys and values."""
        return self.k[i], self.v[i]

    def write(self, i, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
        """Layer i with one new token per row: k, v (B, 1, K, D) written at positions (B,), in place."""
        rows = jnp.arange(k.shape[0])  # an iota: the batch is a parallel dimension of the scatter when sharded
        put = lambda cache, new: cache.at[i, rows, :, positions].set(new[:, 0].astype(cache.dtype))
        return KVCache(put(self.k, k), put(self.v, v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefill:
    """The prompts run through the decoder once."""

    last: jax.Array  # (B, H) final normed hidden state of each prompt's last token: it predicts the next token
    cache: KVCache  # the prompts' keys and values at indices 0..S-1, room for more positions after
    lengths: jax.Array  # (B,) int32 prompt lengths, video spliced in


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The `lax.while_loop` carry: `step` tokens of every row are in `tokens`; token `step - 1` is fed next, at
    position `lengths + step - 1`."""

    step: jax.Array  # () int32
    tokens: jax.Array  # (B, max_new_tokens) int32, pad after EOS and past `step`
    cache: KVCache
    done: jax.Array  # (B,) bool: the row has emitted an EOS
    key: jax.Array  # PRNG key for sampling


# ---------------------------------------------------------------------------------------------- prefill
def prefill(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values, attention_mask,
            extra: int, out_len: int | None = None, num_frames=None) -> Prefill:
    """Splice the videos into the prompts and run them through the decoder, each layer's keys and values written
    into a cache with room for `extra` positions after the longest prompt. input_ids (B, L) with one -200 each,
    right-padded (``attention_mask`` marks real tokens); pixel_values (B, T, C, H, W) or None; num_frames (B,): row
    i's video is its first num_frames[i] frames (default: all T)."""
    execution = require_resolved(execution, "decode.prefill")
    s = llava.embed_inputs(params, cfg, execution, input_ids, pixel_values, attention_mask, out_len=out_len,
                           num_frames=num_frames)
    text, t = params["text"], cfg.text
    b, s_len = s.valid.shape
    cos, sin = qwen2.rope_tables(s.positions, t.head_dim, t.rope_theta)
    attend = qwen2.self_attention(s.positions, s.valid, execution.attention, execution.platform)
    shape = (t.num_layers, b, t.num_kv_heads, s_len + extra, t.head_dim)
    cache = KVCache(jnp.zeros(shape, s.embeds.dtype), jnp.zeros(shape, s.embeds.dtype)).constrained()

    def body(carry, layer):
        h, cache = carry
        p, i = layer
        h, (k, v) = qwen2.decoder_layer(p, h, cos, sin, t, lambda q, k, v: (attend(q, k, v)[0], (k, v)))
        put = lambda c, new: jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3)[None].astype(c.dtype),
                                                          (i, 0, 0, 0, 0))
        return (h, KVCache(put(cache.k, k), put(cache.v, v)).constrained()), None

    h = constrain(s.embeds, ("batch", "length", "act_embed"))
    (h, cache), _ = jax.lax.scan(body, (h, cache), (text["layers"], jnp.arange(t.num_layers)))
    lengths = s.valid.sum(axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return Prefill(last=rms_norm(text["final_norm"], last, t.rms_norm_eps), cache=cache, lengths=lengths)


# ---------------------------------------------------------------------------------------------- generation
@jax.named_scope("xla_cache_attention")  # bench.aot reads attention kinds from these names
def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """One query per row over a layer's cache: q (B, 1, N, D), k / v (B, K, S, D); key j is seen when
    j <= positions[b]. fp32 scores and softmax (model/attention.xla_attention's numerics). Returns (B, 1, N, D)."""
    b, _, n, d = q.shape
    kv = k.shape[1]
    scores = jnp.einsum("bkgd,bksd->bkgs", q.reshape(b, kv, n // kv, d), k,
                        preferred_element_type=jnp.float32) * (d**-0.5)
    seen = jnp.arange(k.shape[2])[None] <= positions[:, None]
    scores = jnp.where(seen[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, n, d)


def decode_step(params: dict, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Tokens (B,) at positions (B,) through the decoder over the cache: (final normed hidden states (B, H), the
    cache with their keys and values written in place)."""
    text, t = params["text"], cfg.text
    cos, sin = qwen2.rope_tables(positions[:, None], t.head_dim, t.rope_theta)

    def body(carry, layer):
        h, cache = carry
        p, i = layer

        def attend(q, k, v):
            new = cache.write(i, k, v, positions)
            return cached_attention(q, *new.layer(i), positions), new

        h, cache = qwen2.decoder_layer(p, h, cos, sin, t, attend)
        return (h, cache.constrained()), None

    x = qwen2.embed(text, tokens, cache.k.dtype)[:, None]
    (h, cache), _ = jax.lax.scan(body, (x, cache), (text["layers"], jnp.arange(t.num_layers)))
    return rms_norm(text["final_norm"], h[:, 0], t.rms_norm_eps), cache


def start_decoding(params: dict, gen: GenerationConfig, p: Prefill, key: jax.Array | None = None) -> DecodeState:
    """The first token of every row (from the prompt's last hidden state) and the loop's initial state."""
    key = jax.random.key(0) if key is None else key
    key, sub = jax.random.split(key)
    first = select_token(qwen2.lm_head(params["text"], p.last, gen.vocab_limit), gen, sub)
    tokens = jnp.full((first.shape[0], gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(jnp.int32(1), tokens, p.cache, jnp.isin(first, jnp.asarray(gen.eos_ids, jnp.int32)), key)


def decode_loop(params: dict, cfg: ModelConfig, gen: GenerationConfig, state: DecodeState,
                lengths: jax.Array) -> DecodeState:
    """Tokens until every row has emitted an EOS or `gen.max_new_tokens` are out: one `decode_step` per token,
    the cache carried and written in place."""
    eos = jnp.asarray(gen.eos_ids, jnp.int32)

    def cond(state: DecodeState):
        return (state.step < gen.max_new_tokens) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        prev = state.tokens[:, state.step - 1]
        h, cache = decode_step(params, cfg, prev, lengths + state.step - 1, state.cache)
        key, sub = jax.random.split(state.key)
        nxt = select_token(qwen2.lm_head(params["text"], h, gen.vocab_limit), gen, sub)
        nxt = jnp.where(state.done, gen.pad_id, nxt)
        return DecodeState(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(nxt), cache=cache,
                           done=state.done | jnp.isin(nxt, eos), key=key)

    return jax.lax.while_loop(cond, body, state)


def finish(gen: GenerationConfig, state: DecodeState) -> tuple[jax.Array, jax.Array]:
    """(tokens (B, max_new_tokens) with pad after EOS, num_tokens (B,) including the EOS)."""
    is_eos = jnp.isin(state.tokens, jnp.asarray(gen.eos_ids, jnp.int32))
    num = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, gen.max_new_tokens)
    return state.tokens, num


# ---------------------------------------------------------------------------------------------- scoring
@jax.named_scope("xla_cache_attention")  # bench.aot reads attention kinds from these names
def partial_attention(q, k, v, seen):
    """Softmax attention of q (B, T, N, D) over k / v (B, K, S, D) where seen (B, T, S) allows it, with the
    log-sum-exp of the seen scores, so that attentions over disjoint key sets merge exactly (`merge`). fp32
    scores. Returns (out (B, T, N, D) in fp32, lse (B, T, N))."""
    b, t, n, d = q.shape
    kv = k.shape[1]
    scores = jnp.einsum("btkgd,bksd->bkgts", q.reshape(b, t, kv, n // kv, d), k,
                        preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(seen[:, None, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # (B, K, G, T); every query here sees at least one key
    probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d), lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def merge(a, b):
    """Attention over the union of two disjoint key sets from each part's (out, lse)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    return out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]


def continuation_states(params: dict, cfg: ModelConfig, p: Prefill, ids: jax.Array) -> jax.Array:
    """Final normed hidden states (B, C, M, H) of C continuations of M tokens per prompt, ids (B, C, M), each
    continuing its own prompt at the prompt's length (module docstring: option scoring)."""
    text, t = params["text"], cfg.text
    b, c, m = ids.shape
    dtype = p.cache.k.dtype
    positions = jnp.broadcast_to(p.lengths[:, None, None] + jnp.arange(m), (b, c, m)).reshape(b, c * m)
    cos, sin = qwen2.rope_tables(positions, t.head_dim, t.rope_theta)
    in_prompt = jnp.arange(p.cache.max_len)[None, None] < p.lengths[:, None, None]  # (B, 1, S)
    causal = jnp.tril(jnp.ones((m, m), bool))[None]  # (1, M, M)

    def body(h, layer):
        p_layer, i = layer

        def attend(q, k, v):  # (B, C*M, ., D): the prompt's cached keys, then the continuation's own
            prompt = partial_attention(q, *p.cache.layer(i), in_prompt)
            own = partial_attention(*(x.reshape(b * c, m, *x.shape[2:]) for x in (q,)),
                                    *(x.reshape(b * c, m, *x.shape[2:]).transpose(0, 2, 1, 3) for x in (k, v)),
                                    causal)
            own = tuple(x.reshape(b, c * m, *x.shape[2:]) for x in own)
            return merge(prompt, own).astype(q.dtype), None

        h, _ = qwen2.decoder_layer(p_layer, h, cos, sin, t, attend)
        return h, None

    x = qwen2.embed(text, ids.reshape(b, c * m), dtype)
    h, _ = jax.lax.scan(body, x, (text["layers"], jnp.arange(t.num_layers)))
    return rms_norm(text["final_norm"], h, t.rms_norm_eps).reshape(b, c, m, -1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] in fp32: the negated per-position cross-entropy of the losses."""
    return -token_nll(logits, targets)


def score_prefilled(params: dict, cfg: ModelConfig, execution: ResolvedExecution, p: Prefill, option_ids,
                    option_mask, vocab_limit: int | None = None, options_per_pass: int | None = None) -> dict:
    """Option log-likelihoods over a prefill's cache (`score_options`)."""
    b, k, m = option_ids.shape
    c = options_per_pass or k
    if k % c:
        raise ValueError(f"options_per_pass={c} does not divide the {k} options")
    text = params["text"]
    # lm_head is always given (B, T, H): its sharding constraint names three axes.
    first = token_logprobs(qwen2.lm_head(text, p.last[:, None], vocab_limit), option_ids[:, :, 0])  # (B, K)

    def score_chunk(_, ids):  # ids (B, C, M): C options of every question
        h = continuation_states(params, cfg, p, ids)[:, :, :-1]  # token j's hidden state predicts token j + 1
        lp = token_logprobs(qwen2.lm_head(text, h.reshape(b, c * (m - 1), -1), vocab_limit),
                            ids[:, :, 1:].reshape(b, c * (m - 1)))
        return None, lp.reshape(b, c, m - 1)

    chunks = option_ids.reshape(b, k // c, c, m).transpose(1, 0, 2, 3)
    # (K/C, B, C, M-1); unrolled where sharded work must not sit inside a loop (ExecutionConfig.resolve)
    _, rest = jax.lax.scan(score_chunk, None, chunks, unroll=execution.loop_collectives == "off")
    rest = rest.transpose(1, 0, 2, 3).reshape(b, k, m - 1)
    token_lp = jnp.where(option_mask, jnp.concatenate([first[..., None], rest], axis=-1), 0.0)
    num_tokens = option_mask.sum(axis=-1)
    total = jnp.where(num_tokens > 0, token_lp.sum(axis=-1), -jnp.inf)
    return {"token_logprobs": token_lp, "logprob_sum": total,
            "logprob_mean": total / jnp.maximum(num_tokens, 1), "num_tokens": num_tokens}


# ---------------------------------------------------------------------------------------------- entry functions
def answer(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values, attention_mask, *,
           gen: GenerationConfig | None = None, option_ids=None, option_mask=None, vocab_limit: int | None = None,
           options_per_pass: int | None = None, out_len: int | None = None, num_frames=None,
           key: jax.Array | None = None) -> dict:
    """One prefill, then the answers asked for: {"generate": {"tokens", "num_tokens"}} with `gen`, {"score": ...}
    (`score_options`' dict) with option_ids / option_mask; both read the same cache. Inputs as `prefill` takes
    them."""
    execution = require_resolved(execution, "decode.answer")
    extra = max(gen.max_new_tokens - 1, 0) if gen is not None else 0
    p = prefill(params, cfg, execution, input_ids, pixel_values, attention_mask, extra, out_len, num_frames)
    out = {}
    if gen is not None:
        final = decode_loop(params, cfg, gen, start_decoding(params, gen, p, key), p.lengths)
        tokens, num = finish(gen, final)
        out["generate"] = {"tokens": tokens, "num_tokens": num}
        # Scoring reads the prompts' positions only, which decoding never writes (it writes from each row's length
        # on): it reads the loop's cache, so the loop can own the prefill's cache without a copy.
        p = dataclasses.replace(p, cache=final.cache)
    if option_ids is not None:
        out["score"] = score_prefilled(params, cfg, execution, p, option_ids, option_mask, vocab_limit,
                                       options_per_pass)
    return out


def generate(params: dict, cfg: ModelConfig, execution: ResolvedExecution, gen: GenerationConfig, input_ids,
             pixel_values, attention_mask, key: jax.Array | None = None, out_len: int | None = None,
             num_frames=None):
    """Returns (tokens (B, max_new_tokens) int32 with pad after EOS, num_tokens (B,) including the EOS).
    Inputs as `prefill` takes them."""
    execution = require_resolved(execution, "decode.generate")
    out = answer(params, cfg, execution, input_ids, pixel_values, attention_mask, gen=gen, out_len=out_len,
                 num_frames=num_frames, key=key)["generate"]
    return out["tokens"], out["num_tokens"]


def score_options(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values,
                  attention_mask, option_ids, option_mask, out_len: int | None = None, vocab_limit: int | None = None,
                  options_per_pass: int | None = None, num_frames=None) -> dict:
    """Log-likelihood of each option continuation (module docstring).

    Prompts as `prefill` takes them; option_ids / option_mask (B, K, M) from data/option_tokens.pad_options;
    ``options_per_pass`` C (a divisor of K; default K) options go through the decoder together (fewer bound the
    activations; the prompts' cache is read in place either way). Returns {"token_logprobs" (B, K, M) (0 at
    padding), "logprob_sum" (B, K), "logprob_mean" (B, K), "num_tokens" (B, K)}; options without tokens score
    -inf."""
    execution = require_resolved(execution, "decode.score_options")
    return answer(params, cfg, execution, input_ids, pixel_values, attention_mask, option_ids=option_ids,
                  option_mask=option_mask, vocab_limit=vocab_limit, options_per_pass=options_per_pass,
                  out_len=out_len, num_frames=num_frames)["score"]
