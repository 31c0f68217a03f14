"""LLaVA-OneVision-Qwen2-7B (lmms-lab/llava-onevision-qwen2-7b-ov): one newline per video ("one_token")."""

from llavaction_jax.config import model_config_dict, text_size, vision_size


def get_config():
    return model_config_dict(
        vision=vision_size(), text=text_size("7b"), projector_type="mlp2x_gelu", pool_mode="bilinear",
        patch_merge_type="spatial_unpad", newline_position="one_token", vision_supervision=None, action_types=(),
        tokenizer_model_max_length=32768, param_dtype="bfloat16", compute_dtype="bfloat16",
    )
