"""The Hugging Face llava-onevision layout: key names and config.json, for exporting `one_token` models.

These are the names the transformers conversion script writes for the hub's llava-onevision models
(transformers `models/llava_onevision/convert_llava_onevision_weights_to_hf.py`), which transformers 4.x and 5.x
both load. Reading such checkpoints needs nothing from here: `keys.normalise_key` already maps every HF spelling
onto the upstream names.
"""

from __future__ import annotations

from llavaction_jax.config import ModelConfig
from llavaction_jax.convert.keys import VISION_PREFIX, ConversionError

HF_VISION_PREFIX = "vision_tower.vision_model."


def hf_key(upstream_key: str) -> str:
    """Upstream LLaVA-NeXT key -> HF llava-onevision key."""
    if upstream_key.startswith(VISION_PREFIX):
        return HF_VISION_PREFIX + upstream_key[len(VISION_PREFIX):]
    if upstream_key.startswith("model.mm_projector."):
        index, rest = upstream_key[len("model.mm_projector."):].split(".", 1)
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{rest}"
    if upstream_key == "model.image_newline":
        return "image_newline"
    if upstream_key.startswith("model."):
        return "language_model." + upstream_key
    if upstream_key == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(f"{upstream_key!r} has no place in the HF llava-onevision layout")


def identity_post_layernorm(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """SigLIP's final LayerNorm: HF modules have it, LLaVA never applies it (it reads a hidden state before it).

    We do not keep it, so the export writes an identity LayerNorm (weight 1, bias 0) to make the HF model load
    without missing keys; its value cannot change any output of the LLaVA model.
    """
    h = cfg.vision.hidden_size
    return {HF_VISION_PREFIX + "post_layernorm.weight": ((h,), 1.0), HF_VISION_PREFIX + "post_layernorm.bias": ((h,), 0.0)}


def check_exportable(cfg: ModelConfig) -> None:
    """The HF model can only express the one_token video layout with bilinear pooling and no action heads."""
    problems = []
    if cfg.newline_position != "one_token" or not cfg.has_image_newline:
        problems.append(f"mm_newline_position={cfg.newline_position!r} (HF appends ONE newline per video)")
    if cfg.pool_mode != "bilinear":
        problems.append(f"mm_spatial_pool_mode={cfg.pool_mode!r} (HF pools bilinearly)")
    if cfg.projector_type != "mlp2x_gelu":
        problems.append(f"mm_projector_type={cfg.projector_type!r} (HF has linear_1, GELU, linear_2)")
    if cfg.vision_supervision is not None:
        problems.append(f"vision_supervision={cfg.vision_supervision!r} (HF has no action token or heads)")
    if problems:
        raise ConversionError("this model cannot be written in the HF llava-onevision layout: " + "; ".join(problems)
                         + ". Use --layout upstream.")


def hf_config(cfg: ModelConfig) -> dict:
    """An HF LlavaOnevisionConfig dict; top-level keys of an imported HF config (cfg.extra) are kept."""
    t, v = cfg.text, cfg.vision
    out = dict(cfg.extra.get("hf_onevision", {}))
    out.update(
        architectures=["LlavaOnevisionForConditionalGeneration"],
        model_type="llava_onevision",
        tie_word_embeddings=t.tie_word_embeddings,
        vision_feature_layer=-1,  # the tower below already stops at the selected layer
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        use_image_newline_parameter=True,
        text_config=dict(
            model_type="qwen2", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings,
            hidden_act="silu",
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps,
            hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        ),
    )
    out.setdefault("image_token_index", 151646)  # transformers' LlavaOnevisionConfig defaults
    out.setdefault("video_token_index", 151647)
    return out
