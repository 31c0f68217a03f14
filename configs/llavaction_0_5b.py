"""LLaVAction-0.5B (MLAdaptiveIntelligence/LLaVAction-0.5B).

Base: lmms-lab/llava-onevision-qwen2-0.5b-ov (Qwen2-0.5B, tied embeddings). Its config carries
`action_types "97,300,3806"`, so it has the action token and the three heads (docs/checkpoints.md). The
released config's `mm_newline_position` is not public; LLaVAction trains with the "grid" default
(llavaction/train/train.py:117 @bd9f465), which we assume here. A converted checkpoint always uses its own
config.json instead.
"""

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, text_size, tower_vision


def get_config() -> ModelConfig:
    return ModelConfig(
        vision=tower_vision(), text=TextConfig(**text_size("0.5b")), projector_type="mlp2x_gelu",
        pool_mode="bilinear", patch_merge_type="spatial_unpad", newline_position="grid",
        vision_supervision="one_token", action_types=(97, 300, 3806), vision_token_training="last_layer",
        tokenizer_model_max_length=32768, param_dtype="bfloat16",
    )


def get_execution() -> ExecutionConfig:
    return ExecutionConfig(compute_dtype="bfloat16")
