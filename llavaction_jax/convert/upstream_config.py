"""Upstream and HF `config.json` <-> `ModelConfig`: the keys read by llavaction/model/llava_arch.py and
llavaction/model/language_model/llava_qwen.py (LLaVA-NeXT / LLaVAction), and HF llava-onevision's.

One table of (our field, upstream key, default) pairs per part (`TEXT_KEYS`, `MODEL_KEYS`, `SUPERVISION_KEYS`, and
the vision tower's hub config keys from its registry entry, `vision_keys`) drives both directions: `from_upstream`
reads every pair (the default when the key is missing), `to_upstream` writes every pair back, and every key outside
the tables travels in `ModelConfig.extra`, so a round trip loses nothing. The upstream config only *names* the
vision tower; its dimensions come from `resolve_vision_tower` (the registered towers' sizes, the local Hugging Face
cache, or an explicit vision config) because head counts cannot be inferred from weight shapes.
A model whose tower is not the named one's size (the tiny preset names so400m but is 64 wide; an HF import's unnamed
tower) gets the tower's hub config under `mm_vision_config` in the config.json we write, and reads it back from there
(with the keys of the tower its name finds in the registry): a key upstream's loader does not read, and transformers'
config classes keep as a plain attribute, so exports of every model we can train convert back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from llavaction_jax import vision_towers
from llavaction_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig, selected_layers, tower_vision
from llavaction_jax.vision_towers import VisionTower

REQUIRED = object()  # a key without a default: its absence is an error


@dataclasses.dataclass(frozen=True)
class Key:
    ours: str  # the field of TextConfig / VisionConfig / ModelConfig
    upstream: str  # its config.json key
    default: Any = REQUIRED  # read when the key is missing


TEXT_KEYS = (  # Qwen2's keys (transformers' Qwen2Config)
    Key("vocab_size", "vocab_size"),
    Key("hidden_size", "hidden_size"),
    Key("intermediate_size", "intermediate_size"),
    Key("num_layers", "num_hidden_layers"),
    Key("num_heads", "num_attention_heads"),
    Key("num_kv_heads", "num_key_value_heads", None),  # None: as many as the query heads
    Key("rms_norm_eps", "rms_norm_eps", 1e-6),
    Key("rope_theta", "rope_theta", None),  # None: transformers v5's rope_parameters, else 10000
    Key("tie_word_embeddings", "tie_word_embeddings", False),
    Key("max_position_embeddings", "max_position_embeddings", 32768),
)
MODEL_KEYS = (  # LLaVA's keys; defaults are the upstream model code's when a key is missing
    Key("vision_tower", "mm_vision_tower"),
    Key("projector_type", "mm_projector_type", "linear"),
    Key("pool_mode", "mm_spatial_pool_mode", "bilinear"),
    Key("patch_merge_type", "mm_patch_merge_type", "flat"),
    # llavaction/model/llava_arch.py:302 @bd9f465 (prepare_inputs_labels_for_multimodal) defaults to "one_token"
    Key("newline_position", "mm_newline_position", "one_token"),
    Key("tokenizer_model_max_length", "tokenizer_model_max_length", None),
    Key("tokenizer_padding_side", "tokenizer_padding_side", "right"),
)
SUPERVISION_KEYS = (  # LLaVAction's vision-supervision keys, written only for a config with heads
    Key("vision_supervision", "vision_supervision", None),
    Key("action_types", "action_types", None),  # "97,300,3806" upstream, (97, 300, 3806) here
    Key("vision_token_training", "vision_token_training", None),  # None: "last_layer"
)
VISION_CONFIG_KEY = "mm_vision_config"  # the tower's hub config, where its name does not give its size
# Keys `to_upstream` writes from typed fields; everything else in an upstream config travels in `extra`.
WRITTEN_KEYS = {k.upstream for k in TEXT_KEYS + MODEL_KEYS + SUPERVISION_KEYS} | {"mm_hidden_size", VISION_CONFIG_KEY}


def _read(keys: tuple[Key, ...], cfg: dict, part: str) -> dict:
    out = {}
    for key in keys:
        if key.upstream in cfg:
            out[key.ours] = cfg[key.upstream]
        elif key.default is REQUIRED:
            raise ConfigError(f"config is missing the {part} key {key.upstream!r}")
        else:
            out[key.ours] = key.default
    return out


def _write(keys: tuple[Key, ...], obj) -> dict:
    return {key.upstream: getattr(obj, key.ours) for key in keys}


def text_from_hf(cfg: dict) -> TextConfig:
    """Qwen2 keys; `rope_theta` may sit in transformers v5's `rope_parameters`. `rope_scaling` is ignored:
    upstream forces it to None for llava_qwen (llavaction/model/language_model/llava_qwen.py:56 @bd9f465)."""
    fields = _read(TEXT_KEYS, cfg, "Qwen2")
    if fields["num_kv_heads"] is None:
        fields["num_kv_heads"] = fields["num_heads"]
    if fields["rope_theta"] is None:
        fields["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    fields["rope_theta"] = float(fields["rope_theta"])
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    return TextConfig(**fields)


def vision_keys(tower: VisionTower) -> tuple[Key, ...]:
    """The tower's hub config.json keys (`VisionTower.config_keys`); `num_layers` is the tower's whole depth, the
    select-layer rule decides how many run."""
    return tuple(Key(*triple) for triple in tower.config_keys)


def vision_from_hf(cfg: dict, select_layer: int = -1, tower: VisionTower | None = None) -> VisionConfig:
    """A vision tower's config dict (hub `config.json` or its `vision_config`) + LLaVA's select-layer rule
    (config.selected_layers). `tower`: whose keys to read; default the one of the dict's `model_type`."""
    cfg = cfg.get("vision_config", cfg)
    tower = tower or vision_towers.by_hf_model_type(cfg.get("model_type"))
    fields = _read(vision_keys(tower), cfg, tower.title)
    fields["num_layers"] = selected_layers(fields["num_layers"], select_layer)
    return VisionConfig(**fields)


def vision_to_hf(vision: VisionConfig, tower: VisionTower, select_layer: int = -2) -> dict:
    """The hub config (`vision_from_hf`'s input, in `tower`'s keys) of a tower that runs `vision.num_layers` layers
    under the select-layer rule: the whole depth is written (the rule is applied again when it is read)."""
    depth = vision.num_layers - 1 - select_layer if select_layer < 0 else vision.num_layers
    fields = {key.upstream: depth if key.ours == "num_layers" else getattr(vision, key.ours)
              for key in vision_keys(tower)}
    return {"model_type": tower.hf_model_type, **fields}


def named_tower_fits(name: str, vision: VisionConfig, select_layer: int = -2) -> bool:
    """Whether `name` is a registered tower's released checkpoint (`VisionTower.sizes`) of exactly these
    dimensions."""
    return name in vision_towers.known_sizes() and tower_vision(name, select_layer) == vision


def resolve_vision_tower(name: str, select_layer: int = -2) -> VisionConfig:
    """Vision dimensions for a tower name: the registered towers' sizes, else a local HF cache/dir, else a clear
    error."""
    known = vision_towers.known_sizes()
    if name in known:
        return tower_vision(name, select_layer)
    tower = vision_towers.lookup(name)
    local = pathlib.Path(name) / "config.json"
    if local.is_file():
        return vision_from_hf(json.loads(local.read_text()), select_layer, tower)
    cached = _find_in_hf_cache(name)
    if cached is not None:
        return vision_from_hf(json.loads(cached.read_text()), select_layer, tower)
    raise ConfigError(
        f"unknown vision tower {name!r}: it is not a built-in preset ({', '.join(known)}), not a local "
        f"directory with config.json, and not in the local Hugging Face cache (HF_HOME). Head counts cannot be "
        f"inferred from weight shapes: pass an explicit vision config (e.g. --vision-config path/to/config.json)."
    )


def _find_in_hf_cache(repo_id: str) -> pathlib.Path | None:
    hf_home = pathlib.Path(os.environ.get("HF_HOME", pathlib.Path.home() / ".cache" / "huggingface"))
    hub = pathlib.Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    snapshots = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def from_upstream(cfg: dict, vision: VisionConfig | dict | None = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of an upstream LLaVA-NeXT / LLaVAction `config.json` dict (or an HF llava-onevision one).
    `vision`: the tower's dimensions (a VisionConfig, or its hub config dict) when its name does not resolve."""
    if "text_config" in cfg and "vision_config" in cfg:
        return _from_hf_onevision(cfg, **overrides)
    if cfg.get("mm_vision_tower") is None and cfg.get("vision_tower") is not None:
        cfg = dict(cfg, mm_vision_tower=cfg["vision_tower"])  # the older key, when the newer is absent
    if cfg.get("mm_vision_tower") is None:
        raise ConfigError("config has no 'mm_vision_tower': not a LLaVA-NeXT/LLaVAction multimodal config")
    fields = _read(MODEL_KEYS, cfg, "LLaVA")
    select_layer = cfg.get("mm_vision_select_layer", -2)
    if isinstance(vision, dict):
        vision = vision_from_hf(vision, select_layer, vision_towers.lookup(fields["vision_tower"]))
    if vision is None and isinstance(cfg.get(VISION_CONFIG_KEY), dict):  # written by to_upstream: the real size
        vision = vision_from_hf(cfg[VISION_CONFIG_KEY], select_layer, vision_towers.lookup(fields["vision_tower"]))
    vision = vision or resolve_vision_tower(fields["vision_tower"], select_layer)
    if "mm_hidden_size" in cfg and cfg["mm_hidden_size"] != vision.hidden_size:
        raise ConfigError(
            f"config key 'mm_hidden_size'={cfg['mm_hidden_size']} disagrees with vision tower "
            f"{fields['vision_tower']!r} (hidden_size {vision.hidden_size})"
        )
    supervision = _read(SUPERVISION_KEYS, cfg, "LLaVAction")
    action_types = supervision["action_types"]
    supervision["action_types"] = tuple(int(x) for x in str(action_types).split(",")) if action_types else ()
    supervision["vision_token_training"] = supervision["vision_token_training"] or "last_layer"
    fields.update(supervision, vision=vision, text=text_from_hf(cfg),
                  extra={k: v for k, v in cfg.items() if k not in WRITTEN_KEYS})
    fields.update(overrides)
    return ModelConfig(**fields)


def to_upstream(cfg: ModelConfig) -> dict:
    """The upstream `config.json` (model_type qwen2, LlavaQwenForCausalLM) that the PyTorch loader reads."""
    out = {k: v for k, v in cfg.extra.items() if k != "hf_onevision"}  # HF-only record, not an upstream key
    out.setdefault("architectures", ["LlavaQwenForCausalLM"])
    out.setdefault("model_type", "qwen2")
    out.update(_write(TEXT_KEYS, cfg.text), hidden_act="silu")
    out.update(_write(MODEL_KEYS, cfg), mm_hidden_size=cfg.vision.hidden_size)
    out.setdefault("mm_vision_select_layer", -2)
    if not named_tower_fits(cfg.vision_tower, cfg.vision, out["mm_vision_select_layer"]):
        out[VISION_CONFIG_KEY] = vision_to_hf(cfg.vision, vision_towers.lookup(cfg.vision_tower),
                                              out["mm_vision_select_layer"])
    if "rope_parameters" in out:  # transformers v5 keeps theta here too; keep both in step
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": cfg.text.rope_theta}
    if "vision_tower" in out:
        out["vision_tower"] = cfg.vision_tower
    if cfg.vision_supervision is not None:
        out.update(_write(SUPERVISION_KEYS, cfg), action_types=",".join(str(n) for n in cfg.action_types))
    return out


def export_config(cfg: ModelConfig) -> dict:
    """`to_upstream` for an export (`convert to-torch`, model directories' config.json): an HF-imported tower has
    no upstream name, and upstream loads towers by name, so a registered tower of the same dimensions is named."""
    out = to_upstream(cfg)
    known = vision_towers.known_sizes()
    if cfg.vision_tower not in known:
        for name in known:
            if named_tower_fits(name, cfg.vision, out["mm_vision_select_layer"]):
                out["mm_vision_tower"] = name
                out.pop(VISION_CONFIG_KEY, None)  # the name now gives the size
    return out


def _from_hf_onevision(cfg: dict, **overrides: Any) -> ModelConfig:
    """HF `LlavaOnevisionConfig`: one newline per video, bilinear pooling, hidden state at `vision_feature_layer`."""
    text = cfg["text_config"]
    if "vocab_size" not in text and "vocab_size" in cfg:
        text = dict(text, vocab_size=cfg["vocab_size"])
    if "tie_word_embeddings" in cfg:
        text = dict(text, tie_word_embeddings=cfg["tie_word_embeddings"])
    layer = cfg.get("vision_feature_layer", -1)
    if isinstance(layer, list):
        raise ConfigError(f"config key 'vision_feature_layer'={layer!r}: several layers are not supported")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"config key 'projector_hidden_act'={act!r}: only exact 'gelu' is supported")
    fields = dict(
        vision=vision_from_hf(cfg["vision_config"], layer),
        text=text_from_hf(dict(text, model_type="qwen2")),
        vision_tower=(cfg["vision_config"].get("_name_or_path")
                      or vision_towers.by_hf_model_type(cfg["vision_config"].get("model_type")).family),
        projector_type="mlp2x_gelu",
        pool_mode="bilinear",
        patch_merge_type="spatial_unpad",
        newline_position="one_token",
        vision_supervision=None,
        action_types=(),
        tokenizer_model_max_length=None,
        extra={"hf_onevision": {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}},
    )
    fields.update(overrides)
    return ModelConfig(**fields)
