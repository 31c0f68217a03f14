"""Qwen2 decoder: RMSNorm, RoPE, grouped-query attention with q/k/v bias, SwiGLU, tied or untied lm_head.

Numerics follow transformers' Qwen2 as used upstream (transformers 4.40's Qwen2Model under
llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM): RMSNorm statistics in fp32,
RoPE tables in fp32, softmax in fp32, logits in fp32. Layers are stacked and run with `lax.scan`. Decoding over a
KV cache (model/decode.py) runs the same `decoder_layer` with its own attention.
"""

from __future__ import annotations

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
def decoder_layer(p: dict, x: jax.Array, cos, sin, cfg: TextConfig, attend):
    """One pre-norm block. `attend(q, k, v) -> (out (B, T, N, D), aux)` attends this layer's queries over keys and
    values (RoPE applied, (B, T, N or K, D)): `self_attention` in training and prefill, the KV cache's attention in
    model/decode.py, which carries the cache in `aux`. Returns (x, aux)."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = rms_norm(p["input_norm"], x, cfg.rms_norm_eps)
    q = linear(p["attn"]["q"], h).reshape(b, t, cfg.num_heads, hd)
    k = linear(p["attn"]["k"], h).reshape(b, t, cfg.num_kv_heads, hd)
    v = linear(p["attn"]["v"], h).reshape(b, t, cfg.num_kv_heads, hd)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    a, aux = attend(q, apply_rope(k, cos, sin), v)
    x = x + linear(p["attn"]["o"], a.reshape(b, t, cfg.num_heads * hd))
    h = rms_norm(p["post_norm"], x, cfg.rms_norm_eps)
    m = p["mlp"]
    gated = jax.nn.silu(linear(m["gate"], h)) * linear(m["up"], h)
    x = x + linear(m["down"], constrain(gated, ("batch", "length", "act_mlp")))
    return constrain(x, ("batch", "length", "act_embed")), aux


def self_attention(positions: jax.Array, valid: jax.Array, attn_impl: str, platform: str):
    """The `attend` of a causal pass over a whole right-padded sequence (queries == keys: the fused kernels apply):
    key j is seen by query i when positions[j] <= positions[i] and j is a real token."""
    mask = dict(q_pos=positions, k_pos=positions, k_valid=valid)
    return lambda q, k, v: (attention(q, k, v, **mask, causal=True, impl=attn_impl, platform=platform), None)


def forward(params: dict, x: jax.Array, positions: jax.Array, valid: jax.Array, cfg: TextConfig, *,
            gather_idx: jax.Array | None = None, remat_policy: str = "none", attn_impl: str = "xla",
            platform: str = "auto", scan: bool = True):
    """Run the decoder on input embeddings x (B, T, H).

    Returns (final normed hidden states (B, T, H), gathered). With `gather_idx` (B, P), `gathered` is
    (L + 1, B, P, H): transformers' `hidden_states` tuple (the embeddings, the outputs of layers 0..L-2, the final
    normed output) read at those positions only, which is all the vision-supervision heads need. `scan` False
    unrolls the layer loop (the same computation, one program region per layer).
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    attend = self_attention(positions, valid, attn_impl, platform)
    take = (lambda h: jnp.take_along_axis(h, gather_idx[..., None], axis=1)) if gather_idx is not None else (lambda h: None)

    def body(h, p):
        out, _ = decoder_layer(p, h, cos, sin, cfg, attend)
        return out, take(h)  # the *input* of each layer: embeddings, then outputs of layers 0..L-2

    x = constrain(x, ("batch", "length", "act_embed"))
    x, layer_inputs = jax.lax.scan(remat(body, remat_policy), x, params["layers"], unroll=not scan)
    x = rms_norm(params["final_norm"], x, cfg.rms_norm_eps)
    gathered = None if gather_idx is None else jnp.concatenate([layer_inputs, take(x)[None]], axis=0)
    return x, gathered


def lm_head(params: dict, h: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """fp32 logits; the tied case reuses the embedding table. `vocab_limit` slices to the tokenizer length."""
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    if vocab_limit is not None:
        w = w[:, :vocab_limit]
    logits = (h @ w.astype(h.dtype)).astype(jnp.float32)
    axes = ("batch", "act_vocab") if logits.ndim == 2 else ("batch", "length", "act_vocab")  # decode steps are 2-D
    return constrain(logits, axes)
