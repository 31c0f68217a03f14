"""ModelConfig <-> upstream config.json (LLaVA-NeXT / LLaVAction keys read by
llavaction/model/llava_arch.py and llavaction/model/language_model/llava_qwen.py) and HF llava-onevision
(convert/upstream_config.py); our own flat config file, old and new.

The LLaVAction-7B dict below is written from docs/checkpoints.md (the 0.5B excerpt's key set, the 7B training
recipe, the LLaVA-Video-7B-Qwen2 base values); the HF llava-onevision dict mirrors llava-hf's
llava-onevision-qwen2-0.5b-ov-hf config.json (nested configs written as diffs against their class defaults, as
transformers 4.x does).
"""

import copy
import json

import pytest

from llavaction_jax.config import ConfigError, ExecutionConfig, ModelConfig, VisionConfig, load_preset
from llavaction_jax.convert.upstream_config import from_upstream, to_upstream

PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

LLAVACTION_7B = {
    "_name_or_path": "lmms-lab/LLaVA-Video-7B-Qwen2",
    "action_types": "97,300,3806",
    "add_faster_video": False,
    "add_time_instruction": True,
    "architectures": ["LlavaQwenForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "faster_token_stride": 10,
    "force_sample": False,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_aspect_ratio": "anyres_max_9",
    "image_crop_resolution": None,
    "image_grid_pinpoints": PINPOINTS,
    "image_split_resolution": None,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "mm_hidden_size": 1152,
    "mm_newline_position": "grid",
    "mm_patch_merge_type": "spatial_unpad",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_spatial_pool_mode": "bilinear",
    "mm_spatial_pool_stride": None,
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "mm_vision_tower_lr": 2e-06,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pos_skipping_range": 4096,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "tokenizer_model_max_length": 32768,
    "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "use_mm_proj": True,
    "use_pos_skipping": False,
    "use_sliding_window": False,
    "vision_supervision": "one_token",
    "vision_token_training": "last_layer",
    "vision_tower_pretrained": None,
    "vocab_size": 152064,
}

HF_ONEVISION_0_5B = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "image_grid_pinpoints": PINPOINTS,
    "image_token_index": 151646,
    "model_type": "llava_onevision",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 152000,
    },
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "video_token_index": 151647,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
}


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------- upstream 7B
def test_llavaction_7b_resolves(empty_hf_home):
    cfg = from_upstream(copy.deepcopy(LLAVACTION_7B))
    v, t = cfg.vision, cfg.text
    # SigLIP so400m with its last layer dropped (mm_vision_select_layer -2 of 27): 26 layers run.
    assert (v.num_layers, v.hidden_size, v.num_heads, v.head_dim) == (26, 1152, 16, 72)
    assert (v.intermediate_size, v.image_size, v.patch_size, v.grid_size, v.layer_norm_eps) == (4304, 384, 14, 27, 1e-6)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers) == (152064, 3584, 18944, 28)
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.rms_norm_eps) == (28, 4, 128, 1e-6)
    assert t.rope_theta == 1e6 and t.tie_word_embeddings is False and t.max_position_embeddings == 32768
    assert (cfg.projector_type, cfg.projector_depth, cfg.pool_mode, cfg.pool_stride) == ("mlp2x_gelu", 2, "bilinear", 2)
    assert (cfg.patch_merge_type, cfg.newline_position, cfg.has_image_newline) == ("spatial_unpad", "grid", True)
    assert (cfg.vision_supervision, cfg.action_types, cfg.vision_token_training) == ("one_token", (97, 300, 3806), "last_layer")
    assert (cfg.num_action_tokens, cfg.num_action_positions) == (1, 1)
    assert cfg.tokenizer_model_max_length == 32768 and cfg.tokenizer_padding_side == "right"
    assert cfg.tokens_per_video(64) == 13441
    assert cfg == ModelConfig()  # the defaults are LLaVAction-7B


def test_to_upstream_preserves_every_key(empty_hf_home):
    src = copy.deepcopy(LLAVACTION_7B)
    out = to_upstream(from_upstream(copy.deepcopy(src)))
    missing = sorted(set(src) - set(out))
    assert not missing, f"to_upstream dropped {missing}"
    changed = {k: (src[k], out[k]) for k in src if out[k] != src[k] or type(out[k]) is not type(src[k])}
    assert not changed, f"to_upstream changed {changed}"
    assert json.loads(json.dumps(out)) == out  # serialisable as config.json
    assert from_upstream(out) == from_upstream(src)


def test_llava_video_7b_without_supervision_roundtrips(empty_hf_home):
    """The base model (no LLaVAction keys): no action token, and no supervision keys invented on the way back."""
    src = {k: v for k, v in LLAVACTION_7B.items() if k not in ("vision_supervision", "action_types", "vision_token_training")}
    cfg = from_upstream(copy.deepcopy(src))
    assert cfg.vision_supervision is None and cfg.num_action_tokens == 0 and cfg.num_action_positions == 0
    assert cfg.tokens_per_video(64) == 13440
    out = to_upstream(cfg)
    assert {k: out.get(k, "<missing>") for k in src} == src
    assert "vision_supervision" not in out and "action_types" not in out


def test_rope_theta_from_transformers_v5_rope_parameters(empty_hf_home):
    src = copy.deepcopy(LLAVACTION_7B)
    del src["rope_theta"]
    src["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    cfg = from_upstream(copy.deepcopy(src))
    assert cfg.text.rope_theta == 1e6
    src["rope_parameters"]["rope_theta"] = 5e5
    assert from_upstream(copy.deepcopy(src)).text.rope_theta == 5e5


def test_to_upstream_preserves_v5_rope_parameters(empty_hf_home):
    """A transformers-v5 config.json keeps its `rope_parameters` through from_upstream -> to_upstream."""
    src = copy.deepcopy(LLAVACTION_7B)
    del src["rope_theta"]
    src["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    out = to_upstream(from_upstream(copy.deepcopy(src)))
    assert out.get("rope_parameters") == src["rope_parameters"]


def test_to_upstream_preserves_alternative_vision_tower_key(empty_hf_home):
    """Upstream also reads the tower name from `vision_tower` (multimodal_encoder/builder.py:
    build_vision_tower); a config spelled that way keeps the key."""
    src = {k: v for k, v in LLAVACTION_7B.items() if k != "mm_vision_tower"}
    src["vision_tower"] = "google/siglip-so400m-patch14-384"
    cfg = from_upstream(copy.deepcopy(src))
    assert cfg.vision.num_layers == 26
    out = to_upstream(cfg)
    assert out.get("vision_tower") == src["vision_tower"]


def test_missing_keys_take_the_model_code_defaults(empty_hf_home):
    """Keys absent from config.json read as upstream's getattr defaults (llava_arch.py:
    prepare_inputs_labels_for_multimodal, e.g. mm_newline_position -> "one_token")."""
    src = {k: v for k, v in LLAVACTION_7B.items()
           if k not in ("mm_newline_position", "mm_spatial_pool_mode", "tokenizer_model_max_length")}
    cfg = from_upstream(src)
    assert cfg.newline_position == "one_token"  # llavaction/model/llava_arch.py:302 @bd9f465, not train.py's "grid"
    assert cfg.pool_mode == "bilinear"
    assert cfg.tokenizer_model_max_length is None  # no truncation
    assert cfg.tokens_per_video(16) == 196 * 16 + 1 + 1  # one newline + the action token


# ---------------------------------------------------------------------------------------------- HF llava-onevision
def test_hf_onevision_config():
    cfg = from_upstream(copy.deepcopy(HF_ONEVISION_0_5B))
    assert cfg.newline_position == "one_token" and cfg.pool_mode == "bilinear" and cfg.has_image_newline
    assert cfg.projector_type == "mlp2x_gelu" and cfg.vision_supervision is None
    v, t = cfg.vision, cfg.text
    assert (v.num_layers, v.hidden_size, v.num_heads, v.intermediate_size, v.grid_size) == (26 + 1 - 1, 1152, 16, 4304, 27)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        152000, 896, 4864, 24, 14, 2)
    assert t.rope_theta == 1e6 and t.tie_word_embeddings is True and t.rms_norm_eps == 1e-6
    assert cfg.tokens_per_video(8) == 196 * 8 + 1  # HF-OV: 196 per frame + one newline per video


@pytest.mark.parametrize("layer", [-1, -2, -5])
def test_hf_onevision_vision_feature_layer(layer):
    src = copy.deepcopy(HF_ONEVISION_0_5B)
    src["vision_feature_layer"] = layer
    assert from_upstream(src).vision.num_layers == 26 + 1 + layer


def test_hf_onevision_v5_rope_parameters():
    src = copy.deepcopy(HF_ONEVISION_0_5B)
    del src["text_config"]["rope_theta"]
    src["text_config"]["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    assert from_upstream(src).text.rope_theta == 1e6


def test_hf_onevision_diffed_vision_config_uses_siglip_defaults():
    """transformers 4.x writes nested configs as diffs against the class defaults, so a key equal to the
    SiglipVisionConfig default is absent. transformers' SiglipVisionConfig defaults: hidden_size 768,
    intermediate_size 3072, num_hidden_layers 12, num_attention_heads 12, image_size 224, patch_size 16,
    layer_norm_eps 1e-6. A 12-layer tower therefore has no num_hidden_layers key and must read as 12 layers."""
    src = copy.deepcopy(HF_ONEVISION_0_5B)
    src["vision_config"] = {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_attention_heads": 16,
                            "intermediate_size": 4304, "vision_use_head": False}
    v = from_upstream(src).vision
    assert (v.hidden_size, v.num_heads, v.image_size, v.patch_size) == (1152, 16, 224, 16)
    assert v.num_layers == 12 + 1 - 1


# ---------------------------------------------------------------------------------------------- tower resolution
def test_unknown_tower_fails_clearly(empty_hf_home):
    src = dict(LLAVACTION_7B, mm_vision_tower="some-org/some-unknown-siglip")
    with pytest.raises(ConfigError) as e:
        from_upstream(src)
    msg = str(e.value)
    assert "some-org/some-unknown-siglip" in msg and "HF_HOME" in msg and "explicit vision config" in msg


TOWER_CONFIG = {  # a hub SiglipModel config.json (vision_config inside), distinct from the so400m preset
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "model_type": "siglip_text_model", "num_hidden_layers": 27},
    "vision_config": {"hidden_size": 1152, "image_size": 224, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 12, "patch_size": 16},
}


def _check_tower(v: VisionConfig, select_layer_used: int):
    assert (v.hidden_size, v.num_heads, v.intermediate_size, v.image_size, v.patch_size) == (1152, 16, 4304, 224, 16)
    assert v.num_layers == select_layer_used and v.grid_size == 14


def test_tower_from_local_hf_cache(empty_hf_home):
    snap = empty_hf_home / "hub" / "models--org--name" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(TOWER_CONFIG))
    cfg = from_upstream(dict(LLAVACTION_7B, mm_vision_tower="org/name"))
    _check_tower(cfg.vision, 12 + 1 - 2)  # mm_vision_select_layer -2
    assert cfg.vision_tower == "org/name"
    assert to_upstream(cfg)["mm_vision_tower"] == "org/name"


def test_tower_from_local_directory(empty_hf_home):
    d = empty_hf_home / "my_tower"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TOWER_CONFIG))
    cfg = from_upstream(dict(LLAVACTION_7B, mm_vision_tower=str(d), mm_vision_select_layer=-1))
    _check_tower(cfg.vision, 12)


def test_tower_from_explicit_vision_config(empty_hf_home):
    cfg = from_upstream(dict(LLAVACTION_7B, mm_vision_tower="nowhere/tower"), vision=TOWER_CONFIG)
    _check_tower(cfg.vision, 11)


def test_mm_hidden_size_must_match_tower(empty_hf_home):
    with pytest.raises(ConfigError, match="mm_hidden_size"):
        from_upstream(dict(LLAVACTION_7B, mm_hidden_size=1024))


# ---------------------------------------------------------------------------------------------- unsupported values
@pytest.mark.parametrize(
    "key,value",
    [
        ("mm_newline_position", "foo"),
        ("mm_spatial_pool_mode", "nearest"),
        ("mm_projector_type", "mlpx_gelu"),
        ("mm_projector_type", "identity"),
        ("vision_supervision", "all_newlines"),
        ("vision_token_training", "sideways"),
        ("mm_patch_merge_type", "maxpool2x2"),
    ],
)
def test_unsupported_values_name_the_key(empty_hf_home, key, value):
    with pytest.raises(ConfigError, match=key) as e:
        from_upstream(dict(LLAVACTION_7B, **{key: value}))
    assert repr(value) in str(e.value) or value in str(e.value)


def test_supervision_needs_three_action_types(empty_hf_home):
    with pytest.raises(ConfigError, match="action_types"):
        from_upstream(dict(LLAVACTION_7B, action_types="97,300"))


# ---------------------------------------------------------------------------------------------- our config file
# llavaction_config.json as ModelConfig.save wrote it before the execution choices had their own type (the tiny
# preset with attention=flash, remat_policy=full, vision_frames_per_step=2): one flat dict of both.
OLD_TINY_FILE = {
    "action_types": [8, 8, 16], "attention": "flash", "compute_dtype": "float32", "extra": {},
    "loop_collectives": "auto", "loss_chunk_tokens": 256, "loss_skip_empty_chunks": True, "newline_position": "grid",
    "param_dtype": "float32", "patch_merge_type": "spatial_unpad", "platform": "auto", "pool_mode": "bilinear",
    "pool_stride": 2, "projector_type": "mlp2x_gelu", "remat_policy": "full",
    "text": {"hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 4096, "num_heads": 4,
             "num_kv_heads": 2, "num_layers": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
             "tie_word_embeddings": False, "vocab_size": 512},
    "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
    "vision": {"hidden_size": 64, "image_size": 64, "intermediate_size": 128, "layer_norm_eps": 1e-06,
               "num_channels": 3, "num_heads": 4, "num_layers": 2, "patch_size": 16},
    "vision_frames_per_step": 2, "vision_supervision": "one_token", "vision_token_training": "last_layer",
    "vision_tower": "google/siglip-so400m-patch14-384",
}


def test_a_config_file_written_before_the_split_loads_into_both_configs(tmp_path):
    from llavaction_jax import checkpoint_io

    (tmp_path / checkpoint_io.CONFIG_FILE).write_text(json.dumps(OLD_TINY_FILE, indent=2))
    cfg, execution = checkpoint_io.load_config(tmp_path), checkpoint_io.load_execution(tmp_path)
    assert cfg == load_preset("tiny")
    assert execution == ExecutionConfig(compute_dtype="float32", attention="flash", remat_policy="full",
                                        vision_frames_per_step=2)
    # and the file written today is the same flat dict, so older readers load it too
    cfg.save(tmp_path / "again.json", execution)
    assert json.loads((tmp_path / "again.json").read_text()) == OLD_TINY_FILE
    # a field added since is written only where it leaves its default (so such a file needs a reader that knows it)
    cfg.save(tmp_path / "unrolled.json", execution.replace(scan_layers=False))
    assert json.loads((tmp_path / "unrolled.json").read_text()) == {**OLD_TINY_FILE, "scan_layers": False}
    assert not ExecutionConfig.load(tmp_path / "unrolled.json").scan_layers


def test_model_config_alone_is_the_architecture():
    fields = set(ModelConfig.__dataclass_fields__)
    assert not fields & set(ExecutionConfig.__dataclass_fields__)
    assert "attention" not in ModelConfig().to_dict() and "param_dtype" in fields  # the weights' dtype is the model's
