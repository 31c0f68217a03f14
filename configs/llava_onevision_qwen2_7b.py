"""LLaVA-OneVision-Qwen2-7B (lmms-lab/llava-onevision-qwen2-7b-ov): one newline per video ("one_token")."""

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, text_size, tower_vision


def get_config() -> ModelConfig:
    return ModelConfig(
        vision=tower_vision(), text=TextConfig(**text_size("7b")), projector_type="mlp2x_gelu", pool_mode="bilinear",
        patch_merge_type="spatial_unpad", newline_position="one_token", vision_supervision=None, action_types=(),
        tokenizer_model_max_length=32768, param_dtype="bfloat16",
    )


def get_execution() -> ExecutionConfig:
    return ExecutionConfig(compute_dtype="bfloat16")
