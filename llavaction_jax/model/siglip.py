"""SigLIP vision tower as LLaVA uses it: patch embedding + learned positions, pre-LN encoder, no CLS, no head.

LLaVA deletes SigLIP's last encoder layer and reads the last remaining hidden state without `post_layernorm`
(llavaction/model/multimodal_encoder/siglip_encoder.py: SigLipVisionTower.load_model). Here that is
`VisionConfig.num_layers` (derived from `mm_vision_select_layer`): we run
exactly that many layers and return their output; `post_layernorm` is never part of the params.

This module and its registry entry (vision_towers.SIGLIP: sizes, checkpoint keys, preprocessing) are the tower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llavaction_jax.config import VisionConfig
from llavaction_jax.model.attention import attention
from llavaction_jax.model.layers import gelu_tanh, layer_norm, linear, remat
from llavaction_jax.model.params import ParamSpec, dense, normal, ones, stacked, zeros
from llavaction_jax.sharding import constrain


def param_specs(cfg: VisionConfig) -> dict:
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    norm = lambda: {"scale": ParamSpec((d,), ("embed",), ones), "bias": ParamSpec((d,), ("embed",), zeros)}
    layer = {
        "ln1": norm(),
        "attn": {
            "q": dense(d, d, "embed", "heads"),
            "k": dense(d, d, "embed", "heads"),
            "v": dense(d, d, "embed", "heads"),
            "o": dense(d, d, "heads", "embed"),
        },
        "ln2": norm(),
        "mlp": {"fc1": dense(d, cfg.intermediate_size, "embed", "mlp"), "fc2": dense(cfg.intermediate_size, d, "mlp", "embed")},
    }
    return {
        # Conv kernel in (kh, kw, in, out) layout, applied as a matmul over flattened patches.
        "patch_embed": {"kernel": ParamSpec((p, p, c, d), (None, None, None, "embed"), normal((p * p * c) ** -0.5)), "bias": ParamSpec((d,), ("embed",), zeros)},
        "pos_embed": ParamSpec((cfg.num_patches, d), ("patch", "embed")),
        "layers": stacked(cfg.num_layers, layer),
    }


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """(N, C, H, W) upstream layout -> (N, gh * gw, p*p*C), patches row-major, each flattened as (kh, kw, c).

    A "valid" stride-p convolution: trailing pixels that do not fill a patch are dropped (384 px / 14 -> 27).
    """
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels[:, :, : gh * patch, : gw * patch].reshape(n, c, gh, patch, gw, patch)
    x = x.transpose(0, 2, 4, 3, 5, 1)  # (N, gh, gw, kh, kw, C)
    return x.reshape(n, gh * gw, patch * patch * c)


@jax.named_scope("siglip")  # names the tower in profiles and compiled programs (bench.aot)
def encoder_layer(p: dict, x: jax.Array, cfg: VisionConfig, attn_impl: str, platform: str = "auto") -> jax.Array:
    n, t, d = x.shape
    heads = lambda y: y.reshape(n, t, cfg.num_heads, cfg.head_dim)
    h = layer_norm(p["ln1"], x, cfg.layer_norm_eps)
    q, k, v = (heads(linear(p["attn"][name], h)) for name in ("q", "k", "v"))
    a = attention(q, k, v, impl=attn_impl, platform=platform).reshape(n, t, d)
    x = x + linear(p["attn"]["o"], a)
    h = layer_norm(p["ln2"], x, cfg.layer_norm_eps)
    x = x + linear(p["mlp"]["fc2"], gelu_tanh(linear(p["mlp"]["fc1"], h)))
    return constrain(x, ("batch", "length", "act_embed"))


def encode(params: dict, pixels: jax.Array, cfg: VisionConfig, *, dtype=jnp.float32, remat_policy: str = "none",
           attn_impl: str = "xla", platform: str = "auto") -> jax.Array:
    """(N, C, H, W) frames in [-1, 1] -> (N, num_patches, hidden) features of the selected layer."""
    expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if tuple(pixels.shape[1:]) != expected:
        raise ValueError(f"frames have shape {tuple(pixels.shape[1:])} (C, H, W); the vision tower expects {expected}")
    pe = params["patch_embed"]
    kernel = pe["kernel"].reshape(-1, cfg.hidden_size).astype(dtype)
    x = patchify(pixels.astype(dtype), cfg.patch_size) @ kernel + pe["bias"].astype(dtype)
    x = x + params["pos_embed"].astype(dtype)[None]
    x = constrain(x, ("batch", "length", "act_embed"))

    body = remat(lambda h, p: (encoder_layer(p, h, cfg, attn_impl, platform), None), remat_policy)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return x
