"""Model configuration: one type for the LLaVA-NeXT / LLaVAction `config.json` and HF llava-onevision.

`ModelConfig.from_upstream(dict)` reads the upstream keys (those read by
llavaction/model/llava_arch.py and llavaction/model/language_model/llava_qwen.py) and `to_upstream()` writes them
back, keeping every key we do not interpret in `extra` so a round trip loses nothing. The upstream config only
*names* the vision tower; its dimensions come from `resolve_vision_tower` (built-in presets, the local Hugging Face
cache, or an explicit vision config) because head counts cannot be inferred from weight shapes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
from typing import Any

POOL_MODES = ("bilinear", "average", "max")
NEWLINE_POSITIONS = ("grid", "frame", "one_token", "no_token")
PROJECTOR_TYPES_HELP = "'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')"
VISION_SUPERVISION = (None, "one_token", "three_tokens", "newline")
VISION_TOKEN_TRAINING = ("last_layer", "first_layer", "all_layers")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "flash", "cudnn", "splash", "auto")  # model/attention.py
LOOP_COLLECTIVES = ("auto", "on", "off")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
AUTO_CPU_FRAMES_PER_STEP = 8


# ---------------------------------------------------------------------------------------------- sizes
# The one size table. Qwen2 sizes are the released checkpoints' config.json values; vision towers are the hub
# config.json values of the tower a LLaVA config names (`mm_vision_tower`), so no download is ever needed.
QWEN2_SIZES: dict[str, dict] = {
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
               max_position_embeddings=32768),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                 max_position_embeddings=32768),
}
SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
VISION_TOWERS: dict[str, dict] = {
    SIGLIP_SO400M: dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=384, patch_size=14, layer_norm_eps=1e-6),
}


class ConfigError(ValueError):
    """A configuration key has a missing or unsupported value."""


def bad_value(key: str, value: Any, allowed: Any) -> ConfigError:
    return ConfigError(f"config key {key!r} has unsupported value {value!r}; expected {allowed}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower. `num_layers` is the number of encoder layers *run*, after the select-layer rule.
    Released sizes live in `VISION_TOWERS` (the one size table), not in defaults here."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder. Released sizes live in `QWEN2_SIZES` (the one size table), not in defaults here."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass reads. Defaults are LLaVAction-7B's (docs/checkpoints.md)."""

    vision: VisionConfig = dataclasses.field(default_factory=lambda: vision_from_hf(VISION_TOWERS[SIGLIP_SO400M], -2))
    text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig(**QWEN2_SIZES["7b"]))
    vision_tower: str = SIGLIP_SO400M
    projector_type: str = "mlp2x_gelu"
    # Video pooling. Upstream hard-codes stride 2 for videos and ignores `mm_spatial_pool_stride`
    # (llavaction/model/llava_arch.py: prepare_inputs_labels_for_multimodal calls get_2dPool with its default stride).
    pool_mode: str = "bilinear"
    pool_stride: int = 2
    patch_merge_type: str = "spatial_unpad"
    newline_position: str = "grid"
    vision_supervision: str | None = "one_token"
    action_types: tuple[int, ...] = (97, 300, 3806)
    vision_token_training: str = "last_layer"
    tokenizer_model_max_length: int | None = 32768
    tokenizer_padding_side: str = "right"
    # Execution (ours, not upstream keys): how the same function is computed. "auto" / 0 values are resolved once
    # at the entry point (`resolved`, from the platform and the mesh size); traced code only reads these fields.
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # "auto": bfloat16 on GPU / TPU, float32 on CPU (`resolved`); float32 if unresolved
    remat_policy: str = "none"
    attention: str = "auto"  # model/attention.py: the fastest kernel that fits each call (xla is the reference)
    vision_frames_per_step: int = 0  # frames of each video per SigLIP step; -1 = all at once, 0 = auto
    loss_chunk_tokens: int = 256  # training LM loss in chunks of this many positions, no full logits; 0 = off
    loss_skip_empty_chunks: bool = True  # skip loss chunks without targets (lax.cond)
    loop_collectives: str = "auto"  # "on" / "off": sharded work inside lax loops and conditionals (off: see resolved)
    platform: str = "auto"  # the backend the program is built for (cpu / gpu / tpu); set by `resolved`
    # Upstream keys we carry but do not interpret, written back verbatim by `to_upstream`.
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived facts
    @property
    def has_image_newline(self) -> bool:
        return "unpad" in self.patch_merge_type

    @property
    def num_action_tokens(self) -> int:
        """Learned tokens appended after the video tokens (`model.action_supervision`)."""
        if self.vision_supervision is None or "token" not in self.vision_supervision:
            return 0
        return 3 if self.vision_supervision == "three_tokens" else 1

    @property
    def appends_action_tokens(self) -> bool:
        """Upstream appends `action_supervision` in the spatial branches only; "flat" never does (llava_arch.py)."""
        return self.num_action_tokens > 0 and "spatial" in self.patch_merge_type

    @property
    def num_action_positions(self) -> int:
        """Hidden states the heads read: 3 for three_tokens, 1 for one_token / newline, 0 without supervision."""
        if self.vision_supervision is None:
            return 0
        return 3 if self.vision_supervision == "three_tokens" else 1

    @property
    def projector_depth(self) -> int:
        if self.projector_type == "linear":
            return 1
        return int(self.projector_type[len("mlp") : -len("x_gelu")])

    def pooled_grid(self) -> int:
        g = self.vision.grid_size
        if self.pool_mode == "bilinear":
            return math.ceil(g / self.pool_stride)
        return g // self.pool_stride  # avg_pool2d / max_pool2d floor

    def tokens_per_video(self, num_frames: int) -> int:
        """Visual tokens spliced in for one video of `num_frames` frames (including action tokens)."""
        h = self.pooled_grid()
        per_frame = h * h
        if "spatial" not in self.patch_merge_type:
            n = num_frames * per_frame  # "flat": pooled, no newline
        elif self.newline_position == "grid":
            n = num_frames * h * (h + 1)
        elif self.newline_position == "frame":
            n = num_frames * (per_frame + 1)
        elif self.newline_position == "one_token":
            n = num_frames * per_frame + (1 if self.has_image_newline else 0)
        else:  # no_token
            n = num_frames * per_frame
        return n + (self.num_action_tokens if self.appends_action_tokens else 0)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        bad = bad_value
        choices = {  # field: (the key errors name, allowed values)
            "pool_mode": ("mm_spatial_pool_mode", POOL_MODES),
            "newline_position": ("mm_newline_position", NEWLINE_POSITIONS),
            "vision_supervision": ("vision_supervision", VISION_SUPERVISION),
            "vision_token_training": ("vision_token_training", VISION_TOKEN_TRAINING),
            "patch_merge_type": ("mm_patch_merge_type", ("flat", "spatial", "spatial_unpad")),
            "remat_policy": ("remat_policy", REMAT_POLICIES),
            "attention": ("attention", ATTENTION_IMPLS),
            "loop_collectives": ("loop_collectives", LOOP_COLLECTIVES),
            "platform": ("platform", PLATFORMS),
            "param_dtype": ("param_dtype", DTYPES),
            "compute_dtype": ("compute_dtype", ("auto",) + DTYPES),
        }
        for field, (key, allowed) in choices.items():
            if getattr(self, field) not in allowed:
                raise bad(key, getattr(self, field), allowed)
        if self.projector_type != "linear":
            depth = self.projector_type[len("mlp") : -len("x_gelu")]
            if not (self.projector_type.startswith("mlp") and self.projector_type.endswith("x_gelu") and depth.isdigit()):
                raise bad("mm_projector_type", self.projector_type, PROJECTOR_TYPES_HELP)
        if "spatial" in self.patch_merge_type and self.newline_position in ("grid", "frame") and not self.has_image_newline:
            raise ConfigError(
                f"mm_newline_position={self.newline_position!r} needs the learned image_newline, which upstream only "
                f"creates when mm_patch_merge_type contains 'unpad' (got {self.patch_merge_type!r})"
            )
        if self.tokenizer_padding_side != "right":
            raise bad("tokenizer_padding_side", self.tokenizer_padding_side, "'right' (the only side upstream trains with)")
        if self.vision_supervision is not None and len(self.action_types) != 3:
            raise ConfigError(f"config key 'action_types' must name 3 class counts (verb,noun,action), got {self.action_types!r}")
        if self.loss_chunk_tokens < 0:
            raise bad("loss_chunk_tokens", self.loss_chunk_tokens, "0 (off) or a positive token count")
        if self.vision_frames_per_step < -1:
            raise bad("vision_frames_per_step", self.vision_frames_per_step, "0 (auto), -1 (all) or a frame count")
        if self.pool_stride != 2:
            raise bad("pool_stride", self.pool_stride,
                      "2 (upstream hard-codes stride 2 for video: llavaction/model/llava_arch.py:"
                      " prepare_inputs_labels_for_multimodal)")
        t = self.text
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            raise ConfigError(f"Qwen2 sizes inconsistent: hidden {t.hidden_size}, heads {t.num_heads}, kv {t.num_kv_heads}")
        v = self.vision
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"SigLIP sizes inconsistent: hidden {v.hidden_size}, heads {v.num_heads}")

    @property
    def effective_compute_dtype(self) -> str:
        """The dtype activations are computed in; an unresolved "auto" computes in the float32 reference."""
        return "float32" if self.compute_dtype == "auto" else self.compute_dtype

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ execution
    def resolved(self, platform: str, num_devices: int) -> "ModelConfig":
        """The execution fields fixed for one platform and mesh size (entry points call this once; the model
        reads the result and never asks JAX for the backend).

        - `platform`: always the one given.
        - `loop_collectives`: "off" on a CPU mesh of several devices (tests' fake devices, multi-process CPU runs):
          XLA:CPU can order the collectives of a sharded computation inside `lax.scan` / `lax.cond` differently
          on different devices and deadlock (see docs/testing.md). With it off, SigLIP takes every frame at once
          and the LM loss is computed unchunked. "on" everywhere else.
        - `compute_dtype` "auto": bfloat16 on GPU / TPU (upstream trains and evaluates in bf16; cuDNN attention
          needs it), float32 on CPU (XLA:CPU has no fast bf16 matmul).
        - `vision_frames_per_step` 0: 8 frames per step on one CPU device (a cache-sized working set: 64 frames
          took 1.9 s in steps of 8 against 3.1 s at once, BENCHMARKS.md), all at once elsewhere.
        """
        if platform not in PLATFORMS[1:]:
            raise bad_value("platform", platform, PLATFORMS[1:])
        loops = self.loop_collectives
        if loops == "auto":
            loops = "off" if platform == "cpu" and num_devices > 1 else "on"
        frames = self.vision_frames_per_step
        if frames == 0:
            frames = AUTO_CPU_FRAMES_PER_STEP if platform == "cpu" and loops == "on" else -1
        compute = self.compute_dtype
        if compute == "auto":
            compute = "float32" if platform == "cpu" else "bfloat16"
        return self.replace(platform=platform, loop_collectives=loops, vision_frames_per_step=frames,
                            compute_dtype=compute)

    # ------------------------------------------------------------------ upstream config.json
    @classmethod
    def from_upstream(cls, cfg: dict, vision: VisionConfig | dict | None = None, **overrides: Any) -> "ModelConfig":
        """Read an upstream LLaVA-NeXT/LLaVAction `config.json` dict (or an HF llava-onevision one)."""
        if "text_config" in cfg and "vision_config" in cfg:
            return _from_hf_onevision(cls, cfg, **overrides)
        tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
        if tower is None:
            raise ConfigError("config has no 'mm_vision_tower': not a LLaVA-NeXT/LLaVAction multimodal config")
        select_layer = cfg.get("mm_vision_select_layer", -2)
        if isinstance(vision, dict):
            vision = vision_from_hf(vision, select_layer)
        vision = vision or resolve_vision_tower(tower, select_layer)
        if "mm_hidden_size" in cfg and cfg["mm_hidden_size"] != vision.hidden_size:
            raise ConfigError(
                f"config key 'mm_hidden_size'={cfg['mm_hidden_size']} disagrees with vision tower {tower!r} "
                f"(hidden_size {vision.hidden_size})"
            )
        action_types = cfg.get("action_types")
        fields = dict(
            vision=vision,
            text=text_from_hf(cfg),
            vision_tower=tower,
            projector_type=cfg.get("mm_projector_type", "linear"),
            pool_mode=cfg.get("mm_spatial_pool_mode", "bilinear"),
            patch_merge_type=cfg.get("mm_patch_merge_type", "flat"),
            # The model code's default when the key is missing is "one_token" (llavaction/model/llava_arch.py:302,
            # prepare_inputs_labels_for_multimodal).
            newline_position=cfg.get("mm_newline_position", "one_token"),
            vision_supervision=cfg.get("vision_supervision"),
            action_types=tuple(int(x) for x in str(action_types).split(",")) if action_types else (),
            vision_token_training=cfg.get("vision_token_training") or "last_layer",
            tokenizer_model_max_length=cfg.get("tokenizer_model_max_length"),
            tokenizer_padding_side=cfg.get("tokenizer_padding_side", "right"),
            extra={k: v for k, v in cfg.items() if k not in _UPSTREAM_KEYS_WE_WRITE},
        )
        fields.update(overrides)
        return cls(**fields)

    def to_upstream(self) -> dict:
        """The upstream `config.json` (model_type qwen2, LlavaQwenForCausalLM) that the PyTorch loader reads."""
        t = self.text
        out = {k: v for k, v in self.extra.items() if k != "hf_onevision"}  # HF-only record, not an upstream key
        out.update(
            architectures=out.get("architectures", ["LlavaQwenForCausalLM"]),
            model_type=out.get("model_type", "qwen2"),
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta,
            tie_word_embeddings=t.tie_word_embeddings,
            max_position_embeddings=t.max_position_embeddings,
            hidden_act="silu",
            mm_vision_tower=self.vision_tower,
            mm_hidden_size=self.vision.hidden_size,
            mm_projector_type=self.projector_type,
            mm_spatial_pool_mode=self.pool_mode,
            mm_patch_merge_type=self.patch_merge_type,
            mm_newline_position=self.newline_position,
            tokenizer_model_max_length=self.tokenizer_model_max_length,
            tokenizer_padding_side=self.tokenizer_padding_side,
        )
        out.setdefault("mm_vision_select_layer", -2)
        if "rope_parameters" in out:  # transformers v5 keeps theta here too; keep both in step
            out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": t.rope_theta}
        if "vision_tower" in out:
            out["vision_tower"] = self.vision_tower
        if self.vision_supervision is not None:
            out.update(
                vision_supervision=self.vision_supervision,
                action_types=",".join(str(n) for n in self.action_types),
                vision_token_training=self.vision_token_training,
            )
        return out

    # ------------------------------------------------------------------ our own serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["action_types"] = list(self.action_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["vision"] = VisionConfig(**d["vision"])
        d["text"] = TextConfig(**d["text"])
        d["action_types"] = tuple(d.get("action_types", ()))
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


# Keys `to_upstream` writes from typed fields; everything else in an upstream config travels in `extra`.
_UPSTREAM_KEYS_WE_WRITE = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
    "max_position_embeddings", "mm_vision_tower", "mm_hidden_size", "mm_projector_type",
    "mm_spatial_pool_mode", "mm_patch_merge_type", "mm_newline_position", "vision_supervision", "action_types",
    "vision_token_training", "tokenizer_model_max_length", "tokenizer_padding_side",
}  # fmt: skip


def text_size(name: str) -> dict:
    """Qwen2 fields of a released size ("7b", "0.5b") for presets."""
    if name not in QWEN2_SIZES:
        raise ConfigError(f"unknown Qwen2 size {name!r}; known: {', '.join(QWEN2_SIZES)}")
    return dict(QWEN2_SIZES[name])


def vision_size(tower: str = SIGLIP_SO400M, select_layer: int = -2) -> dict:
    """VisionConfig fields of a known tower after LLaVA's select-layer rule (so400m at -2: 26 of 27 layers)."""
    return dataclasses.asdict(resolve_vision_tower(tower, select_layer))


def text_from_hf(cfg: dict) -> TextConfig:
    """Qwen2 keys; `rope_theta` may sit in transformers v5's `rope_parameters`."""
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    # `rope_scaling` is ignored: upstream forces it to None for llava_qwen (llava_qwen.py:56).
    try:
        return TextConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        )
    except KeyError as e:
        raise ConfigError(f"config is missing the Qwen2 key {e.args[0]!r}") from None


def vision_from_hf(cfg: dict, select_layer: int = -1) -> VisionConfig:
    """A SigLIP vision config dict (hub `config.json` or its `vision_config`) + LLaVA's select-layer rule.

    `hidden_states` has num_hidden_layers + 1 entries (the embeddings, then each layer's output), so selecting
    entry `k` (negative counts from the end) means running `k` (or `n + 1 + k`) layers. Upstream deletes the last
    SigLIP layer and reads the final hidden state, which is `mm_vision_select_layer=-2` of the 27-layer tower.
    """
    cfg = cfg.get("vision_config", cfg)
    n = cfg.get("num_hidden_layers", 12)  # transformers' SiglipVisionConfig default (diffed configs omit it)
    used = n + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= n:
        raise ConfigError(f"mm_vision_select_layer={select_layer} is out of range for a {n}-layer vision tower")
    return VisionConfig(
        hidden_size=cfg.get("hidden_size", 768),
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_layers=used,
        num_heads=cfg.get("num_attention_heads", 12),
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 16),
        num_channels=cfg.get("num_channels", 3),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
    )


def resolve_vision_tower(name: str, select_layer: int = -2) -> VisionConfig:
    """Vision dimensions for a tower name: built-in preset, else a local HF cache/dir, else a clear error."""
    if name in VISION_TOWERS:
        return vision_from_hf(VISION_TOWERS[name], select_layer)
    local = pathlib.Path(name) / "config.json"
    if local.is_file():
        return vision_from_hf(json.loads(local.read_text()), select_layer)
    cached = _find_in_hf_cache(name)
    if cached is not None:
        return vision_from_hf(json.loads(cached.read_text()), select_layer)
    raise ConfigError(
        f"unknown vision tower {name!r}: it is not a built-in preset ({', '.join(VISION_TOWERS)}), not a local "
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


def _from_hf_onevision(cls, cfg: dict, **overrides: Any) -> ModelConfig:
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
        vision_tower=cfg["vision_config"].get("_name_or_path") or "siglip",
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
    return cls(**fields)


# ---------------------------------------------------------------------------------------------- presets
# Model presets live in configs/<name>.py as ml_collections `get_config()` files (executable documentation);
# `load_preset` turns one into a ModelConfig, with dotted overrides ("text.num_layers=2").
# In a checkout they sit beside the package; `pip install .` puts them inside it (pyproject.toml, package-dir).
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
CONFIGS_DIR = (_PACKAGE_DIR / "configs" if (_PACKAGE_DIR / "configs").is_dir() else _PACKAGE_DIR.parent / "configs")

def model_config_dict(**fields: Any):
    """A ConfigDict with every ModelConfig field (defaults filled in), for configs/*.py files."""
    # Imported here, not at the top: the GPU machine that runs some benchmarks has no ml_collections, and
    # everything else in this module works without it.
    import ml_collections

    d = ModelConfig().to_dict()
    for key, value in fields.items():
        if key in ("vision", "text"):
            d[key].update(value)
        else:
            d[key] = list(value) if isinstance(value, tuple) else value
    d.pop("extra")
    return ml_collections.ConfigDict(d)


def from_config_dict(cd) -> ModelConfig:
    d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    return ModelConfig.from_dict(d)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem not in RECIPES)


RECIPES = ("train",)  # files in configs/ that are run recipes, not model presets


def run_config_file(file: pathlib.Path):
    """Execute a configs/*.py style file and return its `get_config()`."""
    spec = importlib.util.spec_from_file_location(f"llavaction_configs.{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig of configs/<name>.py, with optional dotted overrides {"text.num_layers": 2}."""
    if name not in available_presets():  # a name, never a path: a preset file is executed
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(available_presets())}")
    file = CONFIGS_DIR / f"{name}.py"
    cd = run_config_file(file)
    for key, value in (overrides or {}).items():
        node = cd
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if last not in node:
            raise ConfigError(f"override {key!r}: no such config field in preset {name!r}")
        node[last] = value
    return from_config_dict(cd)
