"""Video tokens: per-frame pooling vs torch, the newline layouts and action tokens vs a reference written here from
upstream llavaction/model/llava_arch.py (`get_2dPool`, `add_token_per_grid`, `add_token_per_frame`, the one_token /
no_token branches and
the `action_supervision` concat), and the token counts of the real LLaVAction-7B geometry (27x27 patches per frame).

The references never call the code under test: pooling comes from torch, layouts from explicit Python loops.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llavaction_jax.config import ModelConfig, TextConfig, VisionConfig
from llavaction_jax.model.video import add_newlines, pool_frames, video_tokens

ATOL = 1e-5  # fp32 on both sides; the only differences are summation order


def _torch_pool(x: np.ndarray, mode: str) -> np.ndarray:
    """upstream get_2dPool on (T, g, g, H) features, stride 2 (llavaction/model/llava_arch.py:175-194 @bd9f465),
    returned as (T, h, h, H)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)  # (T, H, g, g) as upstream after view+permute
    g = t.shape[-1]
    if mode == "bilinear":
        y = F.interpolate(t, size=[math.ceil(g / 2), math.ceil(g / 2)], mode="bilinear", align_corners=False)
    elif mode == "average":
        y = F.avg_pool2d(t, 2)
    elif mode == "max":
        y = F.max_pool2d(t, 2)
    else:
        raise AssertionError(mode)
    return y.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------- pooling vs torch
@pytest.mark.parametrize(
    "mode,g,expected_h",
    [
        ("bilinear", 27, 14), ("bilinear", 8, 4), ("bilinear", 7, 4),
        ("average", 27, 13), ("average", 8, 4), ("average", 7, 3),
        ("max", 27, 13), ("max", 8, 4), ("max", 7, 3),
    ],
)  # fmt: skip
def test_pool_frames_matches_torch(mode, g, expected_h):
    rng = np.random.default_rng(g)
    x = rng.standard_normal((3, g, g, 5)).astype(np.float32)
    ref = _torch_pool(x, mode)
    assert ref.shape == (3, expected_h, expected_h, 5)
    got = np.asarray(pool_frames(jnp.asarray(x), mode))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_bilinear_pool_is_not_antialiased_nor_align_corners():
    """Guards against the two classic wrong choices for 27->14 (both differ from torch's default by >> 1e-5)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 27, 27, 4)).astype(np.float32)
    got = np.asarray(pool_frames(jnp.asarray(x), "bilinear"))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for wrong in (
        F.interpolate(t, size=[14, 14], mode="bilinear", align_corners=True),
        F.interpolate(t, size=[14, 14], mode="bilinear", align_corners=False, antialias=True),
    ):
        assert np.abs(got - wrong.permute(0, 2, 3, 1).numpy()).max() > 1e-2


# ---------------------------------------------------------------------------------------------- layout reference
def _ref_layout(pooled: np.ndarray, newline: np.ndarray | None, position: str) -> np.ndarray:
    """Token list of upstream's video branch for one video, built with explicit loops (llava_arch.py:
    prepare_inputs_labels_for_multimodal, the mm_newline_position branches)."""
    t, h, w, _ = pooled.shape
    rows = []
    if position == "grid":  # add_token_per_grid: frame-major, row-major, a newline after each row of w tokens
        for f in range(t):
            for r in range(h):
                for c in range(w):
                    rows.append(pooled[f, r, c])
                rows.append(newline)
    elif position == "frame":  # add_token_per_frame: the h*w tokens of a frame, then one newline
        for f in range(t):
            for r in range(h):
                for c in range(w):
                    rows.append(pooled[f, r, c])
            rows.append(newline)
    elif position in ("one_token", "no_token"):  # flatten(0, 1); one_token adds one newline if 'unpad'
        for f in range(t):
            for r in range(h):
                for c in range(w):
                    rows.append(pooled[f, r, c])
        if position == "one_token" and newline is not None:
            rows.append(newline)
    else:
        raise AssertionError(position)
    return np.stack(rows)


@pytest.mark.parametrize("position", ["grid", "frame", "one_token", "no_token"])
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4), (2, 3, 3)])
def test_add_newlines_matches_loop_reference(position, shape):
    t, h, w = shape
    d = 6
    rng = np.random.default_rng(t * 100 + h)
    pooled = rng.standard_normal((t, h, w, d)).astype(np.float32)
    newline = rng.standard_normal((d,)).astype(np.float32)
    ref = _ref_layout(pooled, newline, position)
    got = np.asarray(add_newlines(jnp.asarray(pooled), jnp.asarray(newline), position))
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_one_token_without_image_newline_adds_nothing():
    """one_token appends the newline only when 'unpad' created it (llavaction/model/llava_arch.py:348-360 @bd9f465)."""
    pooled = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    got = np.asarray(add_newlines(jnp.asarray(pooled), None, "one_token"))
    np.testing.assert_array_equal(got, _ref_layout(pooled, None, "one_token"))
    assert got.shape == (8, 3)


# ---------------------------------------------------------------------------------------------- video_tokens
def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=14, patch_size=2),
        text=TextConfig(vocab_size=32, hidden_size=6, intermediate_size=12, num_layers=1, num_heads=2, num_kv_heads=1),
        action_types=(5, 7, 11),
        tokenizer_model_max_length=None,
    )
    base.update(kw)
    return ModelConfig(**base)


def _ref_video_tokens(features: np.ndarray, newline, action, pool_mode: str, position: str) -> np.ndarray:
    t, n, d = features.shape
    g = int(round(math.sqrt(n)))
    pooled = _torch_pool(features.reshape(t, g, g, d), pool_mode)  # upstream: view(T, g, g, H), row-major
    tokens = _ref_layout(pooled, newline, position)
    if action is not None:  # action_supervision rows are concatenated after everything (llava_arch.py:336-364 @bd9f465)
        tokens = np.concatenate([tokens, action], axis=0)
    return tokens


@pytest.mark.parametrize(
    "position,supervision,pool_mode,n_action",
    [
        ("grid", "one_token", "bilinear", 1),
        ("grid", "three_tokens", "bilinear", 3),
        ("grid", None, "bilinear", 0),
        ("grid", "newline", "bilinear", 0),  # "newline" supervision reads the last newline, adds no token
        ("frame", "one_token", "bilinear", 1),
        ("one_token", "one_token", "bilinear", 1),
        ("one_token", "three_tokens", "bilinear", 3),
        ("no_token", "one_token", "bilinear", 1),
        ("grid", "one_token", "average", 1),
        ("grid", "one_token", "max", 1),
        ("frame", None, "average", 0),
    ],
)  # fmt: skip
@pytest.mark.parametrize("frames", [1, 3])
def test_video_tokens_matches_reference(position, supervision, pool_mode, n_action, frames):
    cfg = _tiny_cfg(newline_position=position, vision_supervision=supervision, pool_mode=pool_mode)
    d = cfg.text.hidden_size
    g = cfg.vision.grid_size
    assert g == 7
    rng = np.random.default_rng(frames)
    feats = rng.standard_normal((frames, g * g, d)).astype(np.float32)
    newline = rng.standard_normal((d,)).astype(np.float32)
    action = rng.standard_normal((n_action, d)).astype(np.float32) if n_action else None
    params = {"image_newline": jnp.asarray(newline)}
    if action is not None:
        params["action_tokens"] = jnp.asarray(action)
    got = np.asarray(video_tokens(jnp.asarray(feats), params, cfg))
    ref = _ref_video_tokens(feats, newline, action, pool_mode, position)
    assert got.shape == ref.shape
    assert got.shape[0] == cfg.tokens_per_video(frames)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    if n_action:  # the learned rows sit at the very end, after the newline(s)
        np.testing.assert_array_equal(got[-n_action:], action)


def test_flat_merge_still_pools_video_frames():
    """Upstream pools *every* video sample with get_2dPool before looking at mm_patch_merge_type (llava_arch.py
    :292-296); "flat" then only flattens (:305-306). So a flat video has ceil(g/2)^2 tokens per frame, no newline."""
    cfg = _tiny_cfg(patch_merge_type="flat", newline_position="one_token", vision_supervision=None)
    d, g, frames = cfg.text.hidden_size, cfg.vision.grid_size, 2
    feats = np.random.default_rng(1).standard_normal((frames, g * g, d)).astype(np.float32)
    ref = _torch_pool(feats.reshape(frames, g, g, d), "bilinear").reshape(-1, d)
    assert cfg.tokens_per_video(frames) == frames * 4 * 4
    got = np.asarray(video_tokens(jnp.asarray(feats), {}, cfg))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- real 7B geometry
def test_default_config_is_llavaction_7b_geometry():
    cfg = ModelConfig()
    assert cfg.vision.grid_size == 27 and cfg.vision.num_patches == 729
    assert (cfg.pool_mode, cfg.newline_position, cfg.vision_supervision) == ("bilinear", "grid", "one_token")


@pytest.mark.parametrize(
    "changes,per_frame,extra",
    [
        ({}, 14 * 15, 1),  # grid + one_token supervision: 210 per frame + 1 action token
        ({"vision_supervision": None}, 210, 0),
        ({"vision_supervision": "three_tokens"}, 210, 3),
        ({"newline_position": "frame"}, 197, 1),
        ({"newline_position": "frame", "vision_supervision": None}, 197, 0),
        ({"newline_position": "one_token", "vision_supervision": None}, 196, 1),  # HF-OV layout: 196*T + 1
        ({"newline_position": "one_token"}, 196, 2),  # + the newline + the action token
        ({"newline_position": "no_token", "vision_supervision": None}, 196, 0),
        ({"pool_mode": "average", "vision_supervision": None}, 13 * 14, 0),  # 13x13 pooled + 13 newlines = 182
        ({"pool_mode": "max", "vision_supervision": None}, 13 * 14, 0),
        ({"pool_mode": "average"}, 182, 1),
    ],
)  # fmt: skip
@pytest.mark.parametrize("frames", [1, 16, 64])
def test_tokens_per_video_real_config(changes, per_frame, extra, frames):
    cfg = ModelConfig().replace(**changes)
    expected = per_frame * frames + extra
    assert cfg.tokens_per_video(frames) == expected
    # The same count from the actual layout on the real 27x27 geometry (shape-only evaluation keeps it cheap).
    d = 4
    feats = jax.ShapeDtypeStruct((frames, 729, d), jnp.float32)
    params = {"image_newline": jax.ShapeDtypeStruct((d,), jnp.float32),
              "action_tokens": jax.ShapeDtypeStruct((cfg.num_action_tokens, d), jnp.float32)}
    assert jax.eval_shape(lambda f, p: video_tokens(f, p, cfg), feats, params).shape == (expected, d)


def test_video_tokens_real_geometry_values():
    """One real-size frame grid (27x27 -> 14x14 + newlines + action token) with actual values."""
    cfg = ModelConfig()
    d, frames = 3, 2
    rng = np.random.default_rng(9)
    feats = rng.standard_normal((frames, 729, d)).astype(np.float32)
    newline, action = rng.standard_normal((d,)).astype(np.float32), rng.standard_normal((1, d)).astype(np.float32)
    got = np.asarray(video_tokens(jnp.asarray(feats), {"image_newline": jnp.asarray(newline),
                                                       "action_tokens": jnp.asarray(action)}, cfg))
    ref = _ref_video_tokens(feats, newline, action, "bilinear", "grid")
    assert got.shape == ref.shape == (frames * 210 + 1, d)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_headline_counts():
    """Worked token counts of upstream's video branch (llava_arch.py: prepare_inputs_labels_for_multimodal)."""
    sup = ModelConfig()
    plain = sup.replace(vision_supervision=None)
    assert [plain.tokens_per_video(n) for n in (1, 16, 32, 64)] == [210, 3360, 6720, 13440]
    assert [sup.tokens_per_video(n) for n in (1, 16, 32, 64)] == [211, 3361, 6721, 13441]


# ---------------------------------------------------------------------------------------------- frames per step
def test_frames_per_step_divides_the_video_and_keeps_the_batch():
    from llavaction_jax.config import AUTO_CPU_FRAMES_PER_STEP, ExecutionConfig, UnresolvedExecution
    from llavaction_jax.model.llava import frames_per_step

    cfg = ExecutionConfig()
    for setting, batch, frames, want in ((1, 2, 8, 1), (4, 1, 8, 4), (6, 1, 8, 4), (16, 2, 8, 8), (100, 4, 16, 16),
                                         (8, 16, 8, 1), (3, 1, 7, 1)):
        got = frames_per_step(cfg.replace(vision_frames_per_step=setting).resolve("cpu", 1), batch, frames)
        assert got == want and frames % got == 0, (setting, batch, frames, got)
    # auto (0) is resolved at the entry point from the platform and the mesh size
    assert frames_per_step(cfg.resolve("cpu", 1), 1, 16) == AUTO_CPU_FRAMES_PER_STEP
    assert frames_per_step(cfg.resolve("gpu", 1), 4, 64) == 64  # accelerators: everything at once
    assert frames_per_step(cfg.resolve("cpu", 8), 1, 64) == 64  # CPU meshes: no sharded work inside a loop
    with pytest.raises(UnresolvedExecution, match="vision_frames_per_step=0"):
        frames_per_step(cfg, 1, 16)  # unresolved: refused, whatever the backend
    assert frames_per_step(cfg.replace(vision_frames_per_step=-1).resolve("cpu", 1), 1, 16) == 16
    with pytest.raises(Exception, match="vision_frames_per_step"):
        cfg.replace(vision_frames_per_step=-2)


@pytest.mark.parametrize("per_step", [1, 2])
def test_encoding_frames_in_steps_equals_all_at_once(per_step):
    from llavaction_jax.config import ExecutionConfig, load_preset
    from llavaction_jax.model import llava

    cfg = load_preset("tiny")
    steps_of = lambda n: ExecutionConfig(vision_frames_per_step=n).resolve("cpu", 1)
    params = llava.init(cfg, jax.random.key(0))
    size = cfg.vision.image_size
    pixels = jax.random.uniform(jax.random.key(1), (2, 4, 3, size, size), minval=-1, maxval=1)
    whole = llava.encode_videos(params, pixels, cfg, steps_of(1000))
    stepped = llava.encode_videos(params, pixels, cfg, steps_of(2 * per_step))  # 2 videos
    assert stepped.shape == whole.shape == (2, cfg.tokens_per_video(4), cfg.text.hidden_size)
    np.testing.assert_allclose(stepped, whole, atol=1e-5, rtol=1e-5)
    # a mix-up of frames across videos or steps would move tokens: each video differs from the other
    assert np.abs(np.asarray(whole[0] - whole[1])).max() > 1e-2
