"""Configuration: what the weights mean (`ModelConfig`) and how a program computes with them (`ExecutionConfig`).

`ModelConfig` is the architecture of LLaVA-NeXT / LLaVAction: the vision tower, the projector, the token layout,
the Qwen2 sizes, the vision-supervision heads, and the dtype the weights are stored in. `ExecutionConfig` holds the
choices that change how the same function is computed (attention kernel, compute dtype, loss chunking, frames per
vision step, sharded work inside loops, platform, rematerialisation); its "auto" values depend on the devices, so
each entry point (the API, train, eval, the benchmarks) resolves it once for its mesh with
`ExecutionConfig.resolve(platform, num_devices)` (`sharding.resolve_execution(execution, mesh)`). Traced code
(`llava.forward`, the losses, the train step, model/decode.py) takes the `ResolvedExecution` that returns and
refuses anything else with a line naming the fields still "auto" (`require_resolved`), so an unresolved setting
never silently builds a slower graph.

Both are written as one flat dict: the model's fields beside the execution fields. The `model` section of recipes
(`--config.model.<field>=value`) and a model directory's llavaction_config.json use it; `ModelConfig.from_dict` reads the model's fields of such a dict and `ExecutionConfig.from_dict` the others.
Files written before the two were split hold the same flat dict, so they load unchanged.

Reading and writing upstream / HF `config.json` lives beside the converter (convert/upstream_config.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
from typing import Any

from llavaction_jax import vision_towers

POOL_MODES = ("bilinear", "average", "max")
NEWLINE_POSITIONS = ("grid", "frame", "one_token", "no_token")
PROJECTOR_TYPES_HELP = "'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')"
VISION_SUPERVISION = (None, "one_token", "three_tokens", "newline")
VISION_TOKEN_TRAINING = ("last_layer", "first_layer", "all_layers")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "flash", "per_head", "cudnn", "splash", "auto")  # model/attention.py
LOOP_COLLECTIVES = ("auto", "on", "off")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("float32", "bfloat16", "float16")
AUTO_CPU_FRAMES_PER_STEP = 8


# ---------------------------------------------------------------------------------------------- sizes
# The one size table of the language model: the released Qwen2 checkpoints' config.json values. Vision towers'
# sizes live in their registry entries (vision_towers.py: `VisionTower.sizes`, by hub name).
QWEN2_SIZES: dict[str, dict] = {
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
               max_position_embeddings=32768),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                 max_position_embeddings=32768),
}


class ConfigError(ValueError):
    """A configuration key has a missing or unsupported value."""


class UnresolvedExecution(ConfigError):
    """Traced code was given execution choices that were not resolved for its devices."""


def bad_value(key: str, value: Any, allowed: Any) -> ConfigError:
    return ConfigError(f"config key {key!r} has unsupported value {value!r}; expected {allowed}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A vision tower's sizes (which tower computes with them: `ModelConfig.vision_tower`, vision_towers.py).
    `num_layers` is the number of encoder layers *run*, after the select-layer rule. Released sizes live in the
    towers' registry entries (`VisionTower.sizes`), not in defaults here."""

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


def selected_layers(total: int, select_layer: int) -> int:
    """Encoder layers run to read hidden state `select_layer` of a `total`-layer tower.

    `hidden_states` has total + 1 entries (the embeddings, then each layer's output), so entry `k` (negative counts
    from the end) is the output of `k` (or `total + 1 + k`) layers. Upstream deletes the last SigLIP layer and reads
    the final hidden state, which is `mm_vision_select_layer=-2` of the 27-layer tower."""
    used = total + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= total:
        raise ConfigError(f"mm_vision_select_layer={select_layer} is out of range for a {total}-layer vision tower")
    return used


def tower_vision(name: str = vision_towers.DEFAULT_TOWER_NAME, select_layer: int = -2) -> VisionConfig:
    """The VisionConfig of a registered tower's released checkpoint (`VisionTower.sizes`), after the select-layer
    rule (so400m at -2: 26 of 27 layers)."""
    known = vision_towers.known_sizes()
    if name not in known:
        raise ConfigError(f"unknown vision tower {name!r}; built in: {', '.join(known)}")
    size = dict(known[name])
    return VisionConfig(**dict(size, num_layers=selected_layers(size["num_layers"], select_layer)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the weights mean: everything that decides the function the model computes (module docstring).
    Defaults are LLaVAction-7B's (docs/checkpoints.md)."""

    vision: VisionConfig = dataclasses.field(default_factory=tower_vision)
    text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig(**QWEN2_SIZES["7b"]))
    vision_tower: str = vision_towers.DEFAULT_TOWER_NAME  # the tower computing `vision` (vision_towers.lookup)
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
    param_dtype: str = "float32"  # the dtype the weights are stored (and initialised) in
    # Upstream keys we carry but do not interpret, written back verbatim by convert/upstream_config.to_upstream.
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
            "param_dtype": ("param_dtype", DTYPES),
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
        if self.pool_stride != 2:
            raise bad("pool_stride", self.pool_stride,
                      "2 (upstream hard-codes stride 2 for video: llavaction/model/llava_arch.py:"
                      " prepare_inputs_labels_for_multimodal)")
        t = self.text
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            raise ConfigError(f"Qwen2 sizes inconsistent: hidden {t.hidden_size}, heads {t.num_heads}, kv {t.num_kv_heads}")
        v = self.vision
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"{vision_towers.lookup(self.vision_tower).title} sizes inconsistent: hidden "
                              f"{v.hidden_size}, heads {v.num_heads}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the flat dict (module docstring)
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["action_types"] = list(self.action_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The model's fields of a flat config dict; execution fields beside them are left to ExecutionConfig."""
        d = {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}
        d["vision"] = VisionConfig(**d["vision"])
        d["text"] = TextConfig(**d["text"])
        d["action_types"] = tuple(d.get("action_types", ()))
        return cls(**d)

    def save(self, path: str | os.PathLike, execution: "ExecutionConfig | None" = None) -> None:
        """Write the flat dict of this config, with `execution`'s fields beside it when given."""
        d = {**self.to_dict(), **(execution.to_dict() if execution is not None else {})}
        for field, default in LATER_EXECUTION_FIELDS.items():  # at its default: not written (older readers)
            if d.get(field, default) == default:
                d.pop(field, None)
        pathlib.Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


# ---------------------------------------------------------------------------------------------- execution
@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How a program computes the model's function (module docstring). "auto" (0 for the frames) is decided by
    `resolve` from the platform and the mesh size; nothing here changes what the weights mean."""

    compute_dtype: str = "auto"  # activations' dtype; "auto": bfloat16 on GPU / TPU, float32 on CPU
    remat_policy: str = "none"
    scan_layers: bool = True  # decoder layers in one `lax.scan`; False unrolls them (see docs/execution.md)
    attention: str = "auto"  # model/attention.py: the fastest kernel that fits each call (xla is the reference)
    vision_frames_per_step: int = 0  # frames of each video per vision-tower step; -1 = all at once, 0 = auto
    loss_chunk_tokens: int = 256  # training LM loss in chunks of this many positions, no full logits; 0 = off
    loss_skip_empty_chunks: bool = True  # skip loss chunks without targets (lax.cond)
    loop_collectives: str = "auto"  # "on" / "off": sharded work inside lax loops and conditionals (see resolve)
    platform: str = "auto"  # the backend the program is built for (cpu / gpu / tpu); set by `resolve`

    def __post_init__(self) -> None:
        choices = {"remat_policy": REMAT_POLICIES, "attention": ATTENTION_IMPLS, "loop_collectives": LOOP_COLLECTIVES,
                   "platform": PLATFORMS, "compute_dtype": ("auto",) + DTYPES}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise bad_value(field, getattr(self, field), allowed)
        if self.loss_chunk_tokens < 0:
            raise bad_value("loss_chunk_tokens", self.loss_chunk_tokens, "0 (off) or a positive token count")
        if self.vision_frames_per_step < -1:
            raise bad_value("vision_frames_per_step", self.vision_frames_per_step,
                            "0 (auto), -1 (all) or a frame count")

    def unresolved(self) -> tuple[str, ...]:
        """The fields whose value still depends on the devices ("auto"; 0 frames per step)."""
        auto = {"compute_dtype": self.compute_dtype == "auto", "vision_frames_per_step": self.vision_frames_per_step == 0,
                "loop_collectives": self.loop_collectives == "auto", "platform": self.platform == "auto"}
        return tuple(name for name, is_auto in auto.items() if is_auto)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def resolve(self, platform: str, num_devices: int) -> "ResolvedExecution":
        """These choices fixed for one platform and mesh size (entry points call this once; the model reads the
        result and never asks JAX for the backend).

        - `platform`: always the one given.
        - `loop_collectives`: "off" on a CPU mesh of several devices (tests' fake devices, multi-process CPU runs):
          XLA:CPU can order the collectives of a sharded computation inside `lax.scan` / `lax.cond` differently
          on different devices and deadlock (see docs/testing.md). With it off, the vision tower takes every frame
          at once and the LM loss is computed unchunked. "on" everywhere else.
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
        fields = dict(self.to_dict(), platform=platform, loop_collectives=loops, vision_frames_per_step=frames,
                      compute_dtype=compute)
        return ResolvedExecution(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExecutionConfig":
        """The execution fields of a flat config dict (module docstring); absent ones keep their defaults."""
        return cls(**{k: d[k] for k in EXECUTION_FIELDS if k in d})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExecutionConfig":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


@dataclasses.dataclass(frozen=True)
class ResolvedExecution(ExecutionConfig):
    """Execution choices with nothing left to decide for the devices: what traced code takes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unresolved():
            raise UnresolvedExecution(f"a ResolvedExecution cannot keep {', '.join(self.unresolved())} at 'auto'; "
                                      "build it with ExecutionConfig.resolve(platform, num_devices)")


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionConfig))
# Execution fields added after the model / execution split, with their defaults: a saved config leaves them out
# when they are at the default, so a model directory whose run did not use them loads in earlier versions too
# (their ModelConfig.from_dict refuses a field it does not know).
LATER_EXECUTION_FIELDS = {"scan_layers": True}


def require_resolved(execution, where: str) -> ResolvedExecution:
    """`execution` when it is a ResolvedExecution; else an UnresolvedExecution naming what is left to resolve."""
    if isinstance(execution, ResolvedExecution):
        return execution
    if isinstance(execution, ExecutionConfig):
        left = ", ".join(f"{name}={getattr(execution, name)!r}" for name in execution.unresolved()) or "none"
        raise UnresolvedExecution(
            f"{where} needs execution choices resolved for its devices (still auto: {left}); resolve them once at "
            "the entry point: sharding.resolve_execution(execution, mesh) or execution.resolve(platform, num_devices)")
    raise TypeError(f"{where} takes a ResolvedExecution, got {type(execution).__name__}")


def text_size(name: str) -> dict:
    """Qwen2 fields of a released size ("7b", "0.5b") for presets."""
    if name not in QWEN2_SIZES:
        raise ConfigError(f"unknown Qwen2 size {name!r}; known: {', '.join(QWEN2_SIZES)}")
    return dict(QWEN2_SIZES[name])


def vision_size(tower: str = vision_towers.DEFAULT_TOWER_NAME, select_layer: int = -2) -> dict:
    """VisionConfig fields of a registered tower's released checkpoint after LLaVA's select-layer rule, for presets."""
    return dataclasses.asdict(tower_vision(tower, select_layer))


# ---------------------------------------------------------------------------------------------- presets
# Model presets are plain Python files, configs/<name>.py: `get_config()` returns the preset's ModelConfig and, where
# the preset sets execution choices, `get_execution()` its ExecutionConfig. In a checkout they sit beside the
# package; `pip install .` puts them inside it (pyproject.toml, package-dir).
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
CONFIGS_DIR = (_PACKAGE_DIR / "configs" if (_PACKAGE_DIR / "configs").is_dir() else _PACKAGE_DIR.parent / "configs")
RECIPES = ("train",)  # files in configs/ that are run recipes (ml_collections get_config()), not model presets


def config_fields(cfg: ModelConfig, execution: ExecutionConfig | None = None) -> dict:
    """The flat dict of a model config and its execution choices, without the upstream keys carried in `extra`."""
    d = {**cfg.to_dict(), **(execution or ExecutionConfig()).to_dict()}
    d.pop("extra")
    return d


def with_fields(cfg: ModelConfig, execution: ExecutionConfig, fields: dict[str, Any],
                where: str = "override") -> tuple[ModelConfig, ExecutionConfig]:
    """`cfg` and `execution` with dotted fields set, {"text.num_layers": 2, "attention": "flash"}; an unknown field
    is a ConfigError naming it."""
    flat = config_fields(cfg, execution)
    for key, value in fields.items():
        node, *parents, last = flat, *key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node.get(part), dict) else None
            if node is None:
                break
        if node is None or last not in node or isinstance(node[last], dict):
            raise ConfigError(f"{where} {key!r}: no such model config field")
        node[last] = list(value) if isinstance(value, tuple) else value
    return ModelConfig.from_dict({**flat, "extra": cfg.extra}), ExecutionConfig.from_dict(flat)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem not in RECIPES)


def preset_configs(name: str, overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, ExecutionConfig]:
    """The model config and execution choices of configs/<name>.py, with optional dotted overrides
    {"text.num_layers": 2, "attention": "flash"}."""
    if name not in available_presets():  # a name, never a path: a preset file is executed
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(available_presets())}")
    return with_fields(*model_file_configs(CONFIGS_DIR / f"{name}.py"), overrides or {},
                       f"preset {name!r}: override")


def model_file_configs(file: str | pathlib.Path) -> tuple[ModelConfig, ExecutionConfig]:
    """The model config and execution choices of a Python file written like configs/<preset>.py (`get_config()`
    returning a ModelConfig, optionally `get_execution()` an ExecutionConfig). The file is executed."""
    file = pathlib.Path(file)
    if not file.is_file():
        raise ConfigError(f"model config file {file} not found")
    spec = importlib.util.spec_from_file_location(f"llavaction_configs.{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: no get_config() (a model config file returns a ModelConfig from it)")
    cfg = module.get_config()
    execution = module.get_execution() if hasattr(module, "get_execution") else ExecutionConfig()
    if not isinstance(cfg, ModelConfig) or not isinstance(execution, ExecutionConfig):
        raise ConfigError(f"{file}: get_config() must return a ModelConfig and get_execution() an ExecutionConfig")
    return cfg, execution


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig of configs/<name>.py, with optional dotted overrides {"text.num_layers": 2} of model fields
    (execution fields: `preset_configs`)."""
    execution = sorted(set(overrides or {}) & set(EXECUTION_FIELDS))
    if execution:
        raise ConfigError(f"overrides {execution} are execution choices, not model fields: use preset_configs")
    return preset_configs(name, overrides)[0]
