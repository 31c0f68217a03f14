"""A tiny random LLaVAction for tests, the demo and CPU smoke runs.

Same architecture and token layout as LLaVAction-7B (grid newlines, one action token, three heads), shrunk:
64 px frames in 16 px patches (4x4 grid -> 2x2 pooled -> 6 tokens per frame), 2+2 layers, 64/128 wide.
Dimensions divide a (data 2, fsdp 2, tensor 2) mesh. fp32 weights and compute, so parity checks can be tight.
"""

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, VisionConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=64,
                            patch_size=16),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=4096),
        projector_type="mlp2x_gelu", pool_mode="bilinear", patch_merge_type="spatial_unpad", newline_position="grid",
        vision_supervision="one_token", action_types=(8, 8, 16), vision_token_training="last_layer",
        tokenizer_model_max_length=4096, param_dtype="float32",
    )


def get_execution() -> ExecutionConfig:
    return ExecutionConfig(compute_dtype="float32")
