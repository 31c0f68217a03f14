"""The LLaVA-Video / LLaVAction model: frames -> SigLIP -> projector -> video tokens -> splice -> Qwen2 -> logits.

Pure functions over a params dict:
    {"vision": ..., "projector": ..., "image_newline": [H], "action_tokens": [n, H], "text": ..., "heads": ...}
Splicing (`splice_visual_tokens`) is a gather with shapes fixed by the batch shape, never by the data, so a
jitted forward compiles once per (batch, text length, frames) bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from llavaction_jax.config import ModelConfig
from llavaction_jax.model import losses, projector, qwen2, siglip
from llavaction_jax.model.params import ParamSpec, dense, init_params, normal
from llavaction_jax.model.video import layout_tokens, pool_features
from llavaction_jax.sharding import active_mesh_size, constrain

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = losses.IGNORE_INDEX


def param_specs(cfg: ModelConfig) -> dict:
    h = cfg.text.hidden_size
    specs: dict[str, Any] = {
        "vision": siglip.param_specs(cfg.vision),
        "projector": projector.param_specs(cfg.projector_depth, cfg.vision.hidden_size, h),
        "text": qwen2.param_specs(cfg.text),
    }
    if cfg.has_image_newline:
        specs["image_newline"] = ParamSpec((h,), ("embed",), normal(h**-0.5))
    if cfg.num_action_tokens:
        specs["action_tokens"] = ParamSpec((cfg.num_action_tokens, h), ("tokens", "embed"), normal(h**-0.5))
    if cfg.vision_supervision is not None:
        specs["heads"] = {
            name: dense(h, n, "embed", "classes", bias=False) for name, n in zip(("verb", "noun", "action"), cfg.action_types)
        }
    return specs


def init(cfg: ModelConfig, key: jax.Array) -> dict:
    return init_params(param_specs(cfg), key, jnp.dtype(cfg.param_dtype))


@dataclasses.dataclass
class Spliced:
    """The multimodal sequence the decoder sees (all (B, S) unless noted)."""

    embeds: jax.Array  # (B, S, H)
    labels: jax.Array
    valid: jax.Array  # bool: a real token (not padding)
    positions: jax.Array
    action_idx: jax.Array  # (B, P) positions of the action token(s) / last visual token


# Frames per SigLIP step when `vision_frames_per_step` is 0 (auto). On CPU a few frames at a time keep the working
# set in cache: 64 frames took 1.9 s in steps of 8 against 3.1 s at once (bench.generate, 2 cores). Accelerators
# take every frame of the batch at once.
AUTO_CPU_FRAMES_PER_STEP = 8


def frames_per_step(cfg: ModelConfig, batch: int, frames: int) -> int:
    """How many frames of each video one vision step encodes: a divisor of `frames` (every video advances
    together, so the batch axis keeps its sharding)."""
    total = cfg.vision_frames_per_step
    if total == 0:  # CPU meshes of several (fake) devices take all at once: no collectives inside a loop there
        cpu_single = jax.default_backend() == "cpu" and active_mesh_size() == 1
        total = AUTO_CPU_FRAMES_PER_STEP if cpu_single else batch * frames
    per_video = max(1, min(frames, total // batch))
    return max(c for c in range(1, per_video + 1) if frames % c == 0)


def encode_videos(params: dict, pixel_values: jax.Array, cfg: ModelConfig) -> jax.Array:
    """(B, T, C, H, W) frames -> (B, V, H) visual tokens, V = cfg.tokens_per_video(T).

    SigLIP, the projector (on all patches, before pooling: spec 1.4) and pooling run per frame, `frames_per_step`
    frames of every video at a time in a `lax.map`; the newline layout and action tokens then see whole videos."""
    b, t = pixel_values.shape[:2]
    dtype = jnp.dtype(cfg.compute_dtype)

    def pooled_frames(px):  # (B, c, C, H, W) -> (B, c, g', g', H)
        c = px.shape[1]
        feats = siglip.encode(params["vision"], px.reshape(b * c, *px.shape[2:]), cfg.vision, dtype=dtype,
                              remat_policy=cfg.remat_policy, attn_impl=cfg.attention)
        pooled = pool_features(projector.project(params["projector"], feats), cfg)
        return pooled.reshape(b, c, *pooled.shape[1:])

    c = frames_per_step(cfg, b, t)
    if c == t:
        pooled = pooled_frames(pixel_values)
    else:
        steps = pixel_values.reshape(b, t // c, c, *pixel_values.shape[2:]).swapaxes(0, 1)
        pooled = jax.lax.map(pooled_frames, steps).swapaxes(0, 1)
        pooled = pooled.reshape(b, t, *pooled.shape[3:])
    return jax.vmap(lambda f: layout_tokens(f, params, cfg))(pooled)


def splice_visual_tokens(text_embeds, input_ids, labels, attention_mask, visual, has_video, out_len: int,
                         num_action_positions: int) -> Spliced:
    """Replace each sample's single -200 placeholder by its visual tokens (upstream-spec.md 1.6).

    Padding is removed with the attention mask first (any side), the result is right-padded to `out_len` and
    truncated there. Visual positions get label -100. Positions run 0..len-1 on real tokens.
    `action_idx` points at the last `num_action_positions` visual tokens, computed before truncation as upstream.
    """
    b, length = input_ids.shape
    v = visual.shape[1]
    # Compact real tokens to the front, keeping their order (upstream: input_ids[attention_mask]).
    order = jnp.argsort(~attention_mask, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order.reshape(b, length, *([1] * (x.ndim - 2))), axis=1)
    ids, text_embeds, labels = take(input_ids), take(text_embeds), take(labels)
    n_text = attention_mask.sum(axis=1)

    is_placeholder = ids == IMAGE_TOKEN_INDEX
    p = jnp.where(has_video, jnp.argmax(is_placeholder, axis=1), length)  # placeholder position
    n_vis = jnp.where(has_video, v, 0)
    total = n_text - has_video.astype(n_text.dtype) + n_vis

    j = jnp.arange(out_len)[None, :]
    p_, nv_ = p[:, None], n_vis[:, None]
    is_vis = (j >= p_) & (j < p_ + nv_)
    text_idx = jnp.clip(jnp.where(j < p_, j, j - nv_ + has_video[:, None]), 0, length - 1)
    vis_idx = jnp.clip(j - p_, 0, v - 1)
    valid = j < total[:, None]

    emb = jnp.where(is_vis[..., None], jnp.take_along_axis(visual, vis_idx[..., None], axis=1),
                    jnp.take_along_axis(text_embeds, text_idx[..., None], axis=1))
    emb = jnp.where(valid[..., None], emb, 0).astype(text_embeds.dtype)
    out_labels = jnp.where(is_vis | ~valid, IGNORE_INDEX, jnp.take_along_axis(labels, text_idx, axis=1))
    positions = jnp.where(valid, j, 0).astype(jnp.int32)
    last = p + n_vis  # one past the last visual token
    action_idx = jnp.clip(last[:, None] - num_action_positions + jnp.arange(num_action_positions)[None], 0, out_len - 1)
    return Spliced(emb, out_labels, valid, positions, action_idx)


@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array | None  # (B, S, vocab) fp32; None when the loss was computed in chunks
    loss: jax.Array | None = None
    lm_loss: jax.Array | None = None
    aux_loss: jax.Array | None = None  # the vision-supervision loss before its 0.1 weight
    labels: jax.Array | None = None  # labels of the spliced sequence
    valid: jax.Array | None = None  # real-token mask of the spliced sequence
    head_logits: tuple | None = None  # (verb, noun, action) at the last hidden state, when supervised

    def tree_flatten(self):
        return (self.logits, self.loss, self.lm_loss, self.aux_loss, self.labels, self.valid, self.head_logits), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


jax.tree_util.register_pytree_node_class(ModelOutput)


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, pixel_values: jax.Array | None,
            attention_mask: jax.Array | None = None, labels: jax.Array | None = None, actions: jax.Array | None = None,
            has_video: jax.Array | None = None, out_len: int | None = None, vocab_limit: int | None = None,
            return_logits: bool = True) -> ModelOutput:
    """The model's forward pass (jit-able; `cfg`, `out_len`, `vocab_limit`, `return_logits` static).

    input_ids (B, L) with one -200 per video sample; pixel_values (B, T, C, H, W) or None for a text-only batch;
    attention_mask (B, L) bool; labels (B, L) or None; actions (B, 3) verb/noun/action ids (-1 = none).
    With labels, `return_logits=False` and `cfg.loss_chunk_tokens > 0` (training), the LM loss is computed in
    chunks without materialising the logits, and `out.logits` is None.
    """
    has_labels = labels is not None
    s = embed_inputs(params, cfg, input_ids, pixel_values, attention_mask, labels, has_video, out_len)
    n_pos = cfg.num_action_positions
    supervised = n_pos > 0 and pixel_values is not None
    h, gathered = qwen2.forward(params["text"], s.embeds, s.positions, s.valid, cfg.text,
                                gather_idx=s.action_idx if supervised else None,
                                remat_policy=cfg.remat_policy, attn_impl=cfg.attention)
    logits_fn = lambda states: qwen2.lm_head(params["text"], states, vocab_limit)
    chunked = has_labels and not return_logits and cfg.loss_chunk_tokens > 0
    logits = None if chunked else logits_fn(h)
    out = ModelOutput(logits=logits, labels=s.labels, valid=s.valid)
    if supervised:
        out.head_logits = losses.head_logits(params["heads"], gathered[-1], cfg.vision_supervision == "three_tokens")
    if has_labels:
        out.lm_loss = (losses.chunked_lm_loss(h, s.labels, logits_fn, cfg.loss_chunk_tokens) if chunked
                       else losses.lm_loss(logits, s.labels))
        out.loss = out.lm_loss
        if supervised and actions is not None:
            out.aux_loss = losses.vision_supervision_loss(
                params["heads"], gathered, actions, vision_token_training=cfg.vision_token_training,
                three_tokens=cfg.vision_supervision == "three_tokens")
            out.loss = out.lm_loss + losses.AUX_LOSS_WEIGHT * out.aux_loss
    return out


def embed_inputs(params: dict, cfg: ModelConfig, input_ids, pixel_values, attention_mask=None, labels=None,
                 has_video=None, out_len: int | None = None) -> Spliced:
    """Token embeddings with the visual tokens spliced in: everything before the decoder."""
    b, length = input_ids.shape
    dtype = jnp.dtype(cfg.compute_dtype)
    attention_mask = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
    labels = jnp.full((b, length), IGNORE_INDEX, jnp.int32) if labels is None else labels
    text_embeds = qwen2.embed(params["text"], jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids), dtype)
    if pixel_values is None:
        visual = jnp.zeros((b, 1, text_embeds.shape[-1]), dtype)
        has_video = jnp.zeros((b,), bool)
    else:
        visual = encode_videos(params, pixel_values, cfg)
        has_video = jnp.ones((b,), bool) if has_video is None else has_video.astype(bool)
    if out_len is None:
        out_len = default_out_len(cfg, length, visual.shape[1] if pixel_values is not None else 0)
    text_embeds = constrain(text_embeds, ("batch", "length", "act_embed"))
    visual = constrain(visual, ("batch", "length", "act_embed"))
    n_pos = max(cfg.num_action_positions, 1)
    return splice_visual_tokens(text_embeds, input_ids, labels, attention_mask, visual, has_video, out_len, n_pos)


def default_out_len(cfg: ModelConfig, text_len: int, visual_len: int) -> int:
    """Longest possible spliced length for a batch shape, cut at `tokenizer_model_max_length` as upstream."""
    n = text_len - (1 if visual_len else 0) + visual_len
    limit = cfg.tokenizer_model_max_length
    return n if limit is None else min(n, limit)
