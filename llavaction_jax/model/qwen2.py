"""Qwen2 decoder: RMSNorm, RoPE, grouped-query attention with q/k/v bias, SwiGLU, tied or untied lm_head.

Numerics follow transformers' Qwen2 as used upstream (transformers 4.40's Qwen2Model under
llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM): RMSNorm statistics in fp32,
RoPE tables in fp32, softmax in fp32, logits in fp32. Layers are stacked and run with `lax.scan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llavaction_jax.config import TextConfig
from llavaction_jax.model.attention import attention
from llavaction_jax.model.layers import linear, remat, rms_norm
from llavaction_jax.model.params import ParamSpec, dense, ones, stacked
from llavaction_jax.sharding import constrain


def param_specs(cfg: TextConfig) -> dict:
    d, hd = cfg.hidden_size, cfg.head_dim
    layer = {
        "input_norm": {"scale": ParamSpec((d,), ("embed",), ones)},
        "attn": {
            "q": dense(d, cfg.num_heads * hd, "embed", "heads"),
            "k": dense(d, cfg.num_kv_heads * hd, "embed", "kv_heads"),
            "v": dense(d, cfg.num_kv_heads * hd, "embed", "kv_heads"),
            "o": dense(cfg.num_heads * hd, d, "heads", "embed", bias=False),
        },
        "post_norm": {"scale": ParamSpec((d,), ("embed",), ones)},
        "mlp": {
            "gate": dense(d, cfg.intermediate_size, "embed", "mlp", bias=False),
            "up": dense(d, cfg.intermediate_size, "embed", "mlp", bias=False),
            "down": dense(cfg.intermediate_size, d, "mlp", "embed", bias=False),
        },
    }
    specs = {
        "embed": ParamSpec((cfg.vocab_size, d), ("vocab", "embed")),
        "layers": stacked(cfg.num_layers, layer),
        "final_norm": {"scale": ParamSpec((d,), ("embed",), ones)},
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, cfg.vocab_size), ("embed", "vocab"))
    return specs


def embed(params: dict, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(params["embed"], ids, axis=0).astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin of shape (B, T, head_dim) in fp32 (transformers' layout: the half-frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, N, D). rotate_half convention: [x1, x2] -> [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


@jax.named_scope("qwen2")  # names the tower in profiles and compiled programs (bench.aot)
def decoder_layer(p: dict, x: jax.Array, cos, sin, mask: dict, cfg: TextConfig, attn_impl: str, platform: str,
                  kv=None, write_pos=None, attend_cache: bool = True):
    """One pre-norm block; `mask` holds attention's mask arguments (q_pos, k_pos, k_valid).

    With `kv` = (k_cache, v_cache) of shape (B, S_max, K, D), this step's keys and values are written at
    `write_pos` (B,) and attention runs over the whole cache, or over this step's own keys and values when not
    `attend_cache` (a prefill into an empty cache). Returns (x, new kv)."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = rms_norm(p["input_norm"], x, cfg.rms_norm_eps)
    q = linear(p["attn"]["q"], h).reshape(b, t, cfg.num_heads, hd)
    k = linear(p["attn"]["k"], h).reshape(b, t, cfg.num_kv_heads, hd)
    v = linear(p["attn"]["v"], h).reshape(b, t, cfg.num_kv_heads, hd)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = apply_rope(k, cos, sin)
    if kv is not None:
        cache_k, cache_v = (write_rows(c.astype(x.dtype), new, write_pos) for c, new in zip(kv, (k, v)))
        kv = (cache_k.astype(kv[0].dtype), cache_v.astype(kv[1].dtype))
        if attend_cache:
            k, v = cache_k, cache_v
    a = attention(q, k, v, **mask, causal=True, impl=attn_impl, platform=platform).reshape(b, t, cfg.num_heads * hd)
    x = x + linear(p["attn"]["o"], a)
    h = rms_norm(p["post_norm"], x, cfg.rms_norm_eps)
    m = p["mlp"]
    gated = jax.nn.silu(linear(m["gate"], h)) * linear(m["up"], h)
    x = x + linear(m["down"], constrain(gated, ("batch", "length", "act_mlp")))
    return constrain(x, ("batch", "length", "act_embed")), kv


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache (B, S, ...) with new (B, T, ...) written at a per-row offset start (B,)."""
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, axis=0))(cache, new, start)


def forward(params: dict, x: jax.Array, positions: jax.Array, valid: jax.Array, cfg: TextConfig, *,
            gather_idx: jax.Array | None = None, remat_policy: str = "none", attn_impl: str = "xla",
            platform: str = "auto"):
    """Run the decoder on input embeddings x (B, T, H).

    Returns (final normed hidden states (B, T, H), gathered). With `gather_idx` (B, P), `gathered` is
    (L + 1, B, P, H): transformers' `hidden_states` tuple (the embeddings, the outputs of layers 0..L-2, the final
    normed output) read at those positions only, which is all the vision-supervision heads need.
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = dict(q_pos=positions, k_pos=positions, k_valid=valid)
    take = (lambda h: jnp.take_along_axis(h, gather_idx[..., None], axis=1)) if gather_idx is not None else (lambda h: None)

    def body(h, p):
        out, _ = decoder_layer(p, h, cos, sin, mask, cfg, attn_impl, platform)
        return out, take(h)  # the *input* of each layer: embeddings, then outputs of layers 0..L-2

    x = constrain(x, ("batch", "length", "act_embed"))
    x, layer_inputs = jax.lax.scan(remat(body, remat_policy), x, params["layers"])
    x = rms_norm(params["final_norm"], x, cfg.rms_norm_eps)
    gathered = None if gather_idx is None else jnp.concatenate([layer_inputs, take(x)[None]], axis=0)
    return x, gathered


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, (L, B, S_max, K, D) each. Cache index == token position (right padding)."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def repeat_rows(self, times: int) -> "KVCache":
        """Row b becomes rows b * times ... b * times + times - 1 (one prompt's cache continued several ways)."""
        return KVCache(*(jnp.repeat(x, times, axis=1) for x in (self.k, self.v)))


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `max_len` positions: size it to what the call can use (prompt + new tokens)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def forward_cached(params: dict, x: jax.Array, write_pos: jax.Array, cache: KVCache, cfg: TextConfig, *,
                   attn_impl: str = "xla", platform: str = "auto", prefill: bool = False) -> tuple[jax.Array, KVCache]:
    """Decoder over x (B, T, H) whose tokens sit at cache positions write_pos + 0..T-1 (right padding: position ==
    index). Keys at indices <= a query's index are real tokens for every real query, so the mask is causal over
    cache indices. With `prefill` (an empty cache, write_pos all 0) attention runs over the call's own T keys:
    the same result, in the self-attention form (T == S) that the fused kernels (cuDNN, splash) take.
    Returns (final normed hidden states, updated cache)."""
    t, s_max = x.shape[1], cache.max_len
    positions = write_pos[:, None] + jnp.arange(t)[None]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    keys = t if prefill else s_max
    mask = dict(q_pos=positions, k_pos=jnp.broadcast_to(jnp.arange(keys), (x.shape[0], keys)))

    def body(h, layer):
        p, k, v = layer
        out, (k, v) = decoder_layer(p, h, cos, sin, mask, cfg, attn_impl, platform, kv=(k, v), write_pos=write_pos,
                                    attend_cache=not prefill)
        return out, (k, v)

    x, (k, v) = jax.lax.scan(body, x, (params["layers"], cache.k, cache.v))
    return rms_norm(params["final_norm"], x, cfg.rms_norm_eps), KVCache(k, v)


def lm_head(params: dict, h: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """fp32 logits; the tied case reuses the embedding table. `vocab_limit` slices to the tokenizer length."""
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    if vocab_limit is not None:
        w = w[:, :vocab_limit]
    logits = (h @ w.astype(h.dtype)).astype(jnp.float32)
    axes = ("batch", "act_vocab") if logits.ndim == 2 else ("batch", "length", "act_vocab")  # decode steps are 2-D
    return constrain(logits, axes)
