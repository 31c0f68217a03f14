"""The LLaVA-Video / LLaVAction model: frames -> vision tower -> projector -> video tokens -> splice -> Qwen2.

Pure functions over a params dict:
    {"vision": ..., "projector": ..., "image_newline": [H], "action_tokens": [n, H], "text": ..., "heads": ...}
`forward` computes the decoder's hidden states on the spliced sequence (a `ModelOutput`); `lm_logits` and
`head_logits` turn hidden states into logits. Losses live apart, in `llavaction_jax/losses.py`, which the train
step and the public API both call. Splicing (`splice_visual_tokens`) is a gather with shapes fixed by the batch
shape, never by the data, so a jitted forward compiles once per (batch, text length, frames) bucket. Videos of
different lengths share a batch padded to T frames with a per-sample `num_frames`: each keeps the visual tokens of
its own frames (`keep_frames`); the padded frames are encoded and dropped.
The vision tower (SigLIP for every released model) is the module its registry entry names (vision_towers.py,
`tower_module`). Execution choices (attention kernel, compute dtype, frames per vision step, ...) come as a
`ResolvedExecution` beside the config: entry points resolve them once for their mesh
(`sharding.resolve_execution`), and these functions refuse unresolved ones (config.require_resolved).
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from llavaction_jax import vision_towers
from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import projector, qwen2
from llavaction_jax.model.params import ParamSpec, dense, init_params, normal
from llavaction_jax.model.video import layout_tokens, pool_features
from llavaction_jax.sharding import constrain

IMAGE_TOKEN_INDEX = -200  # the placeholder each video sample carries (upstream's constants.IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # label of positions without a target (upstream's constants.IGNORE_INDEX)
HEAD_NAMES = ("verb", "noun", "action")
# Heads added to a checkpoint that lacks them start as upstream's do: nn.Linear layers that transformers'
# _init_weights draws from N(0, initializer_range), Qwen2's 0.02 (llavaction/model/language_model/llava_qwen.py:
# LlavaQwenForCausalLM.__init__, then post_init; upstream @bd9f465). A model initialised whole keeps LeCun
# normal (params.dense), under which tiny models learn from scratch.
HEAD_INIT_STD = 0.02


def tower_module(cfg: ModelConfig) -> ModuleType:
    """The module computing `cfg`'s vision tower (`param_specs`, `encode`): the one its registry entry names."""
    return importlib.import_module(vision_towers.lookup(cfg.vision_tower).module)


def param_specs(cfg: ModelConfig) -> dict:
    h = cfg.text.hidden_size
    specs: dict[str, Any] = {
        "vision": tower_module(cfg).param_specs(cfg.vision),
        "projector": projector.param_specs(cfg.projector_depth, cfg.vision.hidden_size, h),
        "text": qwen2.param_specs(cfg.text),
    }
    if cfg.has_image_newline:
        specs["image_newline"] = ParamSpec((h,), ("embed",), normal(h**-0.5))
    if cfg.num_action_tokens:
        specs["action_tokens"] = ParamSpec((cfg.num_action_tokens, h), ("tokens", "embed"), normal(h**-0.5))
    if cfg.vision_supervision is not None:
        specs["heads"] = {
            name: dense(h, n, "embed", "classes", bias=False) for name, n in zip(HEAD_NAMES, cfg.action_types)
        }
    return specs


def new_part_specs(cfg: ModelConfig, names) -> dict:
    """Specs of the parts ``names`` that fine-tuning adds to a checkpoint lacking them (train's ``init_from``),
    initialised as upstream initialises its new modules: the heads from N(0, ``HEAD_INIT_STD``)."""
    specs = {name: param_specs(cfg)[name] for name in names}
    if "heads" in specs:
        specs["heads"] = jax.tree.map(lambda s: dataclasses.replace(s, init=normal(HEAD_INIT_STD)), specs["heads"],
                                      is_leaf=lambda x: isinstance(x, ParamSpec))
    return specs


def init(cfg: ModelConfig, key: jax.Array) -> dict:
    return init_params(param_specs(cfg), key, jnp.dtype(cfg.param_dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Spliced:
    """The multimodal sequence the decoder sees (all (B, S) unless noted)."""

    embeds: jax.Array  # (B, S, H)
    labels: jax.Array
    valid: jax.Array  # bool: a real token (not padding)
    positions: jax.Array
    action_idx: jax.Array  # (B, P) positions of the action token(s) / last visual token


def frames_per_step(execution: ResolvedExecution, batch: int, frames: int) -> int:
    """How many frames of each video one vision step encodes: a divisor of `frames` (every video advances
    together, so the batch axis keeps its sharding). `execution.vision_frames_per_step` frames of the whole batch
    per step; -1 or `loop_collectives="off"` encode every frame at once."""
    execution = require_resolved(execution, "frames_per_step")
    total = execution.vision_frames_per_step
    if total < 0 or execution.loop_collectives == "off":
        return frames
    per_video = max(1, min(frames, total // batch))
    return max(c for c in range(1, per_video + 1) if frames % c == 0)


def encode_videos(params: dict, pixel_values: jax.Array, cfg: ModelConfig, execution: ResolvedExecution) -> jax.Array:
    """(B, T, C, H, W) frames -> (B, V, H) visual tokens, V = cfg.tokens_per_video(T).

    The vision tower, the projector (on all patches, before pooling: llavaction/model/llava_arch.py:
    LlavaMetaForCausalLM.encode_images) and pooling run per frame, `frames_per_step`
    frames of every video at a time in a `lax.map`; the newline layout and action tokens then see whole videos."""
    execution = require_resolved(execution, "llava.encode_videos")
    b, t = pixel_values.shape[:2]
    dtype = jnp.dtype(execution.compute_dtype)
    tower = tower_module(cfg)

    def pooled_frames(px):  # (B, c, C, H, W) -> (B, c, g', g', H)
        c = px.shape[1]
        feats = tower.encode(params["vision"], px.reshape(b * c, *px.shape[2:]), cfg.vision, dtype=dtype,
                             remat_policy=execution.remat_policy, attn_impl=execution.attention,
                             platform=execution.platform)
        pooled = pool_features(projector.project(params["projector"], feats), cfg)
        return pooled.reshape(b, c, *pooled.shape[1:])

    c = frames_per_step(execution, b, t)
    if c == t:
        pooled = pooled_frames(pixel_values)
    else:
        steps = pixel_values.reshape(b, t // c, c, *pixel_values.shape[2:]).swapaxes(0, 1)
        pooled = jax.lax.map(pooled_frames, steps).swapaxes(0, 1)
        pooled = pooled.reshape(b, t, *pooled.shape[3:])
    return jax.vmap(lambda f: layout_tokens(f, params, cfg))(pooled)


def keep_frames(tokens: jax.Array, num_frames: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Visual tokens of videos padded to T frames -> each video's tokens for its own first `num_frames[i]` frames.

    A video's tokens are its frames' tokens (frame-major, the same count per frame) followed by a fixed tail
    (the one_token newline, the action tokens): `cfg.tokens_per_video` is affine in the frame count. Row i keeps
    its first `num_frames[i]` frames' tokens and moves the tail right after them, as upstream lays out a video of
    that many frames (llavaction/model/llava_arch.py: prepare_inputs_labels_for_multimodal encodes each video of
    the list at its own length). Returns (B, V, H) tokens (rows past a video's length hold copies, never read)
    and the per-row token counts (B,)."""
    tail = cfg.tokens_per_video(0)
    per_frame = cfg.tokens_per_video(1) - tail
    v = tokens.shape[1]
    t = (v - tail) // per_frame
    cut = jnp.clip(num_frames.astype(jnp.int32), 0, t)[:, None] * per_frame
    j = jnp.arange(v)[None, :]
    idx = jnp.clip(jnp.where(j < cut, j, j - cut + t * per_frame), 0, v - 1)
    return jnp.take_along_axis(tokens, idx[..., None], axis=1), cut[:, 0] + tail


def splice_visual_tokens(text_embeds, input_ids, labels, attention_mask, visual, has_video, out_len: int,
                         num_action_positions: int, num_visual: jax.Array | None = None) -> Spliced:
    """Replace each sample's single -200 placeholder by its visual tokens (upstream
    llavaction/model/llava_arch.py: prepare_inputs_labels_for_multimodal, lines 437-588 @bd9f465).

    Padding is removed with the attention mask first (any side), the result is right-padded to `out_len` and
    truncated there. Visual positions get label -100. Positions run 0..len-1 on real tokens.
    `action_idx` points at the last `num_action_positions` visual tokens, computed before truncation as upstream.
    `num_visual` (B,): how many of a row's visual tokens are real (default: all V).
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
    n_vis = jnp.where(has_video, v if num_visual is None else num_visual, 0)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    """What the model computes for a batch, on the spliced sequence (S = L - 1 + visual tokens, or `out_len`)."""

    hidden: jax.Array  # (B, S, H) final normed hidden states
    labels: jax.Array  # (B, S) labels of the spliced sequence (-100 on visual tokens and padding)
    valid: jax.Array  # (B, S) bool: a real token, not padding
    # (L + 1, B, P, H): transformers' `hidden_states` (embeddings, every layer's input, the final normed output)
    # at the P action positions; None when the config has no vision-supervision heads or the batch no video.
    action_states: jax.Array | None = None


def forward(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids: jax.Array,
            pixel_values: jax.Array | None, attention_mask: jax.Array | None = None, labels: jax.Array | None = None,
            has_video: jax.Array | None = None, out_len: int | None = None,
            num_frames: jax.Array | None = None) -> ModelOutput:
    """The decoder's hidden states for a batch (jit-able; `cfg`, `execution` and `out_len` static).

    input_ids (B, L) with one -200 per video sample; pixel_values (B, T, C, H, W) or None for a text-only batch;
    attention_mask (B, L) bool; labels (B, L) or None (spliced alongside the inputs, for the losses);
    has_video (B,) bool marks rows whose frames are real (default: all, when pixel_values is given);
    num_frames (B,) int: row i's video is its first num_frames[i] frames, the rest padding (default: all T).
    """
    execution = require_resolved(execution, "llava.forward")
    s = embed_inputs(params, cfg, execution, input_ids, pixel_values, attention_mask, labels, has_video, out_len,
                     num_frames)
    supervised = cfg.num_action_positions > 0 and pixel_values is not None
    h, gathered = qwen2.forward(params["text"], s.embeds, s.positions, s.valid, cfg.text,
                                gather_idx=s.action_idx if supervised else None,
                                remat_policy=execution.remat_policy, attn_impl=execution.attention,
                                platform=execution.platform, scan=execution.scan_layers)
    return ModelOutput(hidden=h, labels=s.labels, valid=s.valid, action_states=gathered)


def lm_logits(params: dict, hidden: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """fp32 next-token logits (B, S, vocab) of hidden states; `vocab_limit` slices to len(tokenizer) as upstream's
    load-time `resize_token_embeddings` does."""
    return qwen2.lm_head(params["text"], hidden, vocab_limit)


def head_logits(heads: dict, states: jax.Array, three_tokens: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """states (..., P, H) at the action positions -> (verb, noun, action) logits in fp32.

    one_token / newline: every head reads position 0; three_tokens: verb 0, noun 1, action 2
    (`llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM.forward`)."""
    pos = (0, 1, 2) if three_tokens else (0, 0, 0)
    return tuple((states[..., i, :] @ heads[name]["kernel"].astype(states.dtype)).astype(jnp.float32)
                 for name, i in zip(HEAD_NAMES, pos))


def embed_inputs(params: dict, cfg: ModelConfig, execution: ResolvedExecution, input_ids, pixel_values,
                 attention_mask=None, labels=None, has_video=None, out_len: int | None = None,
                 num_frames=None) -> Spliced:
    """Token embeddings with the visual tokens spliced in: everything before the decoder."""
    execution = require_resolved(execution, "llava.embed_inputs")
    b, length = input_ids.shape
    dtype = jnp.dtype(execution.compute_dtype)
    attention_mask = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
    labels = jnp.full((b, length), IGNORE_INDEX, jnp.int32) if labels is None else labels
    text_embeds = qwen2.embed(params["text"], jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids), dtype)
    num_visual = None
    if pixel_values is None:
        visual = jnp.zeros((b, 1, text_embeds.shape[-1]), dtype)
        has_video = jnp.zeros((b,), bool)
    else:
        visual = encode_videos(params, pixel_values, cfg, execution)
        has_video = jnp.ones((b,), bool) if has_video is None else has_video.astype(bool)
        if num_frames is not None:
            visual, num_visual = keep_frames(visual, num_frames, cfg)
    if out_len is None:
        out_len = default_out_len(cfg, length, visual.shape[1] if pixel_values is not None else 0)
    text_embeds = constrain(text_embeds, ("batch", "length", "act_embed"))
    visual = constrain(visual, ("batch", "length", "act_embed"))
    n_pos = max(cfg.num_action_positions, 1)
    return splice_visual_tokens(text_embeds, input_ids, labels, attention_mask, visual, has_video, out_len, n_pos,
                                num_visual)


def default_out_len(cfg: ModelConfig, text_len: int, visual_len: int) -> int:
    """Longest possible spliced length for a batch shape, cut at `tokenizer_model_max_length` as upstream."""
    n = text_len - (1 if visual_len else 0) + visual_len
    limit = cfg.tokenizer_model_max_length
    return n if limit is None else min(n, limit)
