"""Parity against tiny random transformers PyTorch models (fp32): Qwen2, SigLIP, and LLaVA-OneVision video.

Weights are randomised (biases and norm scales too, so a forgotten bias or scale cannot hide) and mapped with the
converter's key table. Tolerance: max |logit diff| <= 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                          Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

from llavaction_jax.config import ExecutionConfig, ModelConfig
from llavaction_jax.convert.import_plan import torch_to_params
from llavaction_jax.convert.upstream_config import from_upstream, text_from_hf, vision_from_hf
from llavaction_jax.api import forward_with_losses
from llavaction_jax.model import llava, qwen2, siglip
from llavaction_jax.model.params import init_params

TOL = 1e-4


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return module.eval()


def state_numpy(module: torch.nn.Module, prefix: str = "") -> dict:
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def qwen2_config(tied: bool) -> Qwen2Config:
    return Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=tied)


SIGLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_logits_match_transformers_with_padding(tied):
    hf_cfg = qwen2_config(tied)
    torch.manual_seed(0)
    model = randomise(Qwen2ForCausalLM(hf_cfg))
    text_cfg = text_from_hf(hf_cfg.to_dict())
    assert text_cfg.rope_theta == 1e6 and text_cfg.tie_word_embeddings == tied
    params = torch_to_params(state_numpy(model), ModelConfig(text=text_cfg), expected={"text": qwen2.param_specs(text_cfg)})["text"]
    assert ("lm_head" in params) != tied

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, size=(3, 11))
    lengths = np.array([11, 7, 4])  # right padding, as upstream
    mask = np.arange(11)[None] < lengths[:, None]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()

    positions = jnp.broadcast_to(jnp.arange(11), (3, 11))
    h, _ = qwen2.forward(params, qwen2.embed(params, jnp.asarray(ids)), positions, jnp.asarray(mask), text_cfg)
    ours = np.asarray(qwen2.lm_head(params, h))
    assert ours.dtype == np.float32
    diff = np.abs(ours - ref)[mask]  # padded positions are undefined in both
    assert diff.max() <= TOL, diff.max()


def test_siglip_selected_layer_matches_transformers():
    hf_cfg = SiglipVisionConfig(num_hidden_layers=3, **SIGLIP)
    torch.manual_seed(0)
    model = randomise(SiglipVisionModel(hf_cfg))
    # LLaVA reads hidden_states[-2] of this 3-layer tower (mm_vision_select_layer=-2): 2 layers, no post-LN.
    vis_cfg = vision_from_hf(hf_cfg.to_dict(), select_layer=-2)
    assert vis_cfg.num_layers == 2
    state = state_numpy(model, prefix="vision_tower.")  # vision_tower.vision_model.* (HF OV layout)
    params = torch_to_params(state, ModelConfig(vision=vis_cfg), expected={"vision": siglip.param_specs(vis_cfg)})

    pixels = np.random.default_rng(1).uniform(-1, 1, size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states[-2].numpy()
    ours = np.asarray(siglip.encode(params["vision"], jnp.asarray(pixels), vis_cfg))
    assert ours.shape == ref.shape == (3, 16, 32)
    assert np.abs(ours - ref).max() <= TOL


def test_siglip_rejects_frames_of_the_wrong_size():
    vis_cfg = vision_from_hf(dict(num_hidden_layers=2, **SIGLIP), select_layer=-1)
    params = init_params(siglip.param_specs(vis_cfg), jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        siglip.encode(params, jnp.zeros((1, 3, 28, 32)), vis_cfg)


@pytest.fixture(scope="module")
def onevision():
    hf_cfg = LlavaOnevisionConfig(
        text_config=qwen2_config(False), vision_config=SiglipVisionConfig(num_hidden_layers=2, **SIGLIP),
        image_token_index=300, video_token_index=301, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomise(LlavaOnevisionForConditionalGeneration(hf_cfg))
    cfg = from_upstream(hf_cfg.to_dict())
    params = torch_to_params(state_numpy(model), cfg)
    return model, cfg, params


def test_onevision_video_logits_match_transformers(onevision):
    model, cfg, params = onevision
    assert cfg.newline_position == "one_token" and cfg.vision.num_layers == 2
    frames = 3
    n_video = cfg.tokens_per_video(frames)
    assert n_video == frames * 2 * 2 + 1  # 4x4 patches -> 2x2 bilinear, one newline per video
    rng = np.random.default_rng(2)
    before, after = rng.integers(0, 300, size=(2, 5)), rng.integers(0, 300, size=(2, 4))
    pixels = rng.uniform(-1, 1, size=(2, frames, 3, 32, 32)).astype(np.float32)

    hf_ids = np.concatenate([before, np.full((2, n_video), 301), after], axis=1)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(hf_ids), pixel_values_videos=torch.tensor(pixels)).logits.numpy()

    ids = np.concatenate([before, np.full((2, 1), -200), after], axis=1)  # upstream convention
    out = forward_with_losses(params, jnp.asarray(ids), jnp.asarray(pixels), None, None, None, cfg=cfg,
                              execution=ExecutionConfig().resolve("cpu", 1))
    assert out.logits.shape == ref.shape
    assert np.abs(np.asarray(out.logits) - ref).max() <= TOL
