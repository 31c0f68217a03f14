"""LLaVAction-7B (MLAdaptiveIntelligence/LLaVAction-7B).

LLaVA-Video-7B-Qwen2 fine-tuned on EK100-MQA: SigLIP-so400m (26 layers) -> mlp2x_gelu -> bilinear 27->14 pooling
with a newline after every pooled row (210 tokens per frame) -> one learned action token -> Qwen2-7B, plus
verb/noun/action heads (97/300/3806) trained with the `last_layer` auxiliary loss. 64 frames in the final model.
Source: the authors' training script (docs/checkpoints.md).
"""

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, text_size, tower_vision


def get_config() -> ModelConfig:
    return ModelConfig(
        vision=tower_vision(), text=TextConfig(**text_size("7b")), projector_type="mlp2x_gelu", pool_mode="bilinear",
        patch_merge_type="spatial_unpad", newline_position="grid",
        vision_supervision="one_token", action_types=(97, 300, 3806), vision_token_training="last_layer",
        tokenizer_model_max_length=32768, param_dtype="bfloat16",
    )


def get_execution() -> ExecutionConfig:
    return ExecutionConfig(compute_dtype="bfloat16")
