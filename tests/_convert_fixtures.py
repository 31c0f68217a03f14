"""Synthetic PyTorch checkpoints in the upstream LLaVA-NeXT / LLaVAction layout, for the converter tests.

Keys come from `keys.upstream_keys` (derived from the parameter specs through the key rules; the HF parity test
checks those rules against a real transformers state dict), values are random, files are written by the official
`safetensors` writer in two shards with an index, and config.json is written by hand in
the form released checkpoints have (model_type qwen2, LlavaQwenForCausalLM, grid newlines), so nothing here
depends on our own exporter.
"""

import dataclasses
import json
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from llavaction_jax.config import load_preset
from llavaction_jax.convert.keys import map_key, torch_shape, upstream_keys
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths

# SigLIP hub-style config: 3 layers, of which mm_vision_select_layer=-2 runs 2 (upstream deletes the last).
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, image_size=64, patch_size=16, layer_norm_eps=1e-6)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def tiny_cfg(heads: bool = True, tied: bool = False):
    cfg = load_preset("tiny")  # grid newlines, 2+2 layers, 64/128 wide
    return cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied),
                       vision_supervision="one_token" if heads else None, action_types=(8, 8, 16) if heads else ())


def write_vision_tower(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(SIGLIP))
    return directory


def upstream_config(cfg, tower: str, dtype: str) -> dict:
    t = cfg.text
    out = {
        "_name_or_path": "lmms-lab/LLaVA-Video-7B-Qwen2", "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": "silu", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "tie_word_embeddings": t.tie_word_embeddings, "max_position_embeddings": 4096,
        "torch_dtype": dtype, "use_cache": True, "transformers_version": "4.40.0.dev0",
        "mm_vision_tower": tower, "mm_hidden_size": 64, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": None,
        "mm_resampler_type": None, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_vision_tower_lr": 2e-6,
        "mm_projector_lr": None, "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        "image_crop_resolution": None, "image_split_resolution": None, "add_faster_video": False,
        "faster_token_stride": 10, "add_time_instruction": True, "force_sample": False,
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "use_mm_proj": True,
        "use_pos_skipping": False, "pos_skipping_range": 4096, "vision_tower_pretrained": None,
    }  # fmt: skip
    if cfg.vision_supervision is not None:
        out.update(vision_supervision="one_token", action_types="8,8,16", vision_token_training="last_layer")
    return out


def upstream_tensors(cfg, dtype: str, unused: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors for every upstream key of `cfg`; with `unused`, also the keys upstream never reads
    (SigLIP post_layernorm and the deleted last encoder layer)."""
    rng = np.random.default_rng(seed)
    specs = flatten_paths(llava.param_specs(cfg))
    keys = list(upstream_keys(cfg))
    out = {}
    for key in keys:
        path, layer, tf = map_key(key)
        shape = specs[path].shape[1:] if layer is not None else specs[path].shape
        out[key] = rng.standard_normal(torch_shape(shape, tf)).astype(DTYPES[dtype])
    if unused:
        deeper = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=cfg.vision.num_layers + 1))
        for key in upstream_keys(deeper):
            if f"encoder.layers.{cfg.vision.num_layers}." in key:
                out[key] = rng.standard_normal(8).astype(DTYPES[dtype])  # shape is irrelevant: never read
        for name in ("weight", "bias"):
            out[f"model.vision_tower.vision_tower.vision_model.post_layernorm.{name}"] = (
                rng.standard_normal(cfg.vision.hidden_size).astype(DTYPES[dtype]))
    return out


def write_checkpoint(directory: pathlib.Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 2) -> None:
    """safetensors shards + model.safetensors.index.json (or one model.safetensors) + config and tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({keys[j]: tensors[keys[j]] for j in part}, directory / name, metadata={"format": "pt"})
            weight_map.update({keys[j]: name for j in part})
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "padding_side": "right"}))


def make_upstream_checkpoint(directory: pathlib.Path, heads=True, tied=False, dtype="float32", unused=False, seed=0,
                             shards=2):
    """Write a complete synthetic checkpoint; returns (config dict, tensors)."""
    cfg = tiny_cfg(heads, tied)
    tower = write_vision_tower(directory.parent / f"{directory.name}-siglip")
    config = upstream_config(cfg, str(tower), dtype)
    tensors = upstream_tensors(cfg, dtype, unused, seed)
    write_checkpoint(directory, config, tensors, shards)
    return config, tensors
