"""LLaVA-Video-7B-Qwen2 (lmms-lab/LLaVA-Video-7B-Qwen2): LLaVAction-7B's base, without action token or heads.

Grid newlines (210 tokens per frame), bilinear pooling, Qwen2-7B untied, vocabulary 152064.
"""

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, text_size, tower_vision


def get_config() -> ModelConfig:
    return ModelConfig(
        vision=tower_vision(), text=TextConfig(**text_size("7b")), projector_type="mlp2x_gelu", pool_mode="bilinear",
        patch_merge_type="spatial_unpad", newline_position="grid", vision_supervision=None, action_types=(),
        tokenizer_model_max_length=32768, param_dtype="bfloat16",
    )


def get_execution() -> ExecutionConfig:
    return ExecutionConfig(compute_dtype="bfloat16")
