"""Visual tokens of a video: per-frame 2-D pooling, the newline layout, then the learned action token(s).

Order follows upstream (`llavaction/model/llava_arch.py: prepare_inputs_labels_for_multimodal`): the projector has
already run on every patch;
each frame's g x g grid is pooled with stride 2, newline vectors are inserted according to
`mm_newline_position`, frames are concatenated frame-major, and `action_supervision` rows are appended last.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.config import ModelConfig


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation weights of torch's bilinear resize, align_corners=False, no antialias.

    torch uses scale = n_in / n_out, src = max((dst + 0.5) * scale - 0.5, 0), and blends in[floor(src)] with
    in[min(floor(src) + 1, n_in - 1)]. Written as a matrix so pooling is two small matmuls.
    """
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for dst in range(n_out):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w = src - i0
        m[dst, i0] += 1.0 - w
        m[dst, i1] += w
    return m


def pool_frames(x: jax.Array, mode: str, stride: int = 2) -> jax.Array:
    """(T, g, g, H) -> (T, h, h, H). bilinear: h = ceil(g / stride); average / max: h = floor(g / stride)."""
    t, g, _, d = x.shape
    if mode == "bilinear":
        m = jnp.asarray(bilinear_matrix(g, math.ceil(g / stride)), jnp.float32)
        y = jnp.einsum("oi,tijd->tojd", m, x.astype(jnp.float32))
        y = jnp.einsum("pj,tojd->topd", m, y)
        return y.astype(x.dtype)
    h = g // stride
    x = x[:, : h * stride, : h * stride].reshape(t, h, stride, h, stride, d)
    if mode == "average":
        return x.astype(jnp.float32).mean(axis=(2, 4)).astype(x.dtype)
    if mode == "max":
        return x.max(axis=(2, 4))
    raise ValueError(f"unsupported pool mode {mode!r}")


def add_newlines(x: jax.Array, newline: jax.Array | None, position: str) -> jax.Array:
    """(T, h, w, H) pooled frames -> (tokens, H) in upstream's layout for `mm_newline_position`."""
    t, h, w, d = x.shape
    if position == "grid":  # a newline after every row of every frame: T * h * (w + 1)
        nl = jnp.broadcast_to(newline.astype(x.dtype), (t, h, 1, d))
        return jnp.concatenate([x, nl], axis=2).reshape(t * h * (w + 1), d)
    if position == "frame":  # a newline after every frame: T * (h * w + 1)
        nl = jnp.broadcast_to(newline.astype(x.dtype), (t, 1, d))
        return jnp.concatenate([x.reshape(t, h * w, d), nl], axis=1).reshape(-1, d)
    flat = x.reshape(t * h * w, d)
    if position == "one_token" and newline is not None:  # one newline after the whole video
        return jnp.concatenate([flat, newline.astype(x.dtype)[None]], axis=0)
    return flat  # "no_token" (crashes upstream; here it is just the pooled tokens)


def video_tokens(features: jax.Array, params: dict, cfg: ModelConfig) -> jax.Array:
    """Projected patch features (T, g*g, H) of one video -> its visual tokens (cfg.tokens_per_video(T), H)."""
    return layout_tokens(pool_features(features, cfg), params, cfg)


def pool_features(features: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Projected patch features (T, g*g, H) -> pooled frames (T, g', g', H). Every video is pooled. Per frame, so
    it can run on a chunk of frames."""
    t, _, d = features.shape
    g = cfg.vision.grid_size
    return pool_frames(features.reshape(t, g, g, d), cfg.pool_mode, cfg.pool_stride)


def layout_tokens(pooled: jax.Array, params: dict, cfg: ModelConfig) -> jax.Array:
    """Pooled frames (T, g', g', H) of one video -> its visual tokens: newline layout, then the action token(s)."""
    d = pooled.shape[-1]
    # "flat": no newline, no action token (llavaction/model/llava_arch.py:305-306 @bd9f465)
    if "spatial" not in cfg.patch_merge_type:
        return pooled.reshape(-1, d)
    tokens = add_newlines(pooled, params.get("image_newline"), cfg.newline_position)
    if cfg.appends_action_tokens:
        tokens = jnp.concatenate([tokens, params["action_tokens"].astype(tokens.dtype)], axis=0)
    return tokens
