"""Vision towers, chosen by name: the one registry. A tower is one module plus one entry here.

The module (SigLIP's is `llavaction_jax/model/siglip.py`) computes the tower:

    param_specs(vision: VisionConfig) -> a tree of ParamSpec (logical axes from sharding.LOGICAL_RULES)
    encode(params, pixels, vision, *, dtype, remat_policy, attn_impl, platform) -> features
        pixels (N, C, H, W) as the entry's `preprocessing` makes them; features (N, grid_size**2, hidden_size)
        of the layer LLaVA reads (`VisionConfig.num_layers` layers run), before the projector

The entry (a `VisionTower` in `TOWERS`) is everything the rest of the package knows of the tower without running
it: the sizes of its released checkpoints by hub name (config.py's presets and defaults), the keys of its hub
`config.json` (convert/upstream_config.py), where its tensors sit in upstream's and HF llava-onevision's state
dicts and how each maps onto our parameters (convert/keys.py, convert/hf_onevision.py), which of its parameters
are not weight-decayed (train/optim.py), and how frames become its pixels (data/image.py). `model/llava.py` runs
the module the entry names. docs/architecture.md: adding a tower.

A model's tower is found from `ModelConfig.vision_tower`, the name upstream's config.json gives (`mm_vision_tower`),
by name as upstream's `build_vision_tower` picks one (llavaction/model/multimodal_encoder/builder.py): a family
name, a hub name of an entry's `sizes`, else the first entry whose `claims` pattern occurs in the name (upstream:
`"siglip" in vision_tower`). A name no entry claims (a local directory, `--vision-config` with another name) is read
as the default tower, SigLIP, the only one LLaVA-Video and LLaVAction ship with.

This module imports nothing from the package, so config.py, data/ and convert/ all read it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How uint8 frames become a tower's pixels (upstream's image processor for it): squash every frame to the
    tower's `image_size` with PIL's `resample` filter (no crop, aspect ratio not kept), multiply by `rescale` in
    float64 and cast to float32, then `(x - mean) / std` per channel in float32, channels first."""

    resample: str = "bicubic"  # a PIL.Image.Resampling name
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so tables can be cached per entry
class VisionTower:
    """What the package knows of one vision tower without running it (module docstring)."""

    family: str  # the registry key
    title: str  # how messages name it
    module: str  # the module with param_specs and encode (module docstring)
    claims: str  # regex searched in a tower name: a name it matches is this tower's
    # Released checkpoints: hub name -> VisionConfig fields, `num_layers` being the whole depth (the select-layer
    # rule decides how many run), so no download is ever needed for them.
    sizes: Mapping[str, Mapping[str, Any]]
    # (VisionConfig field, hub config.json key, default when the key is missing), in the order an export writes them
    config_keys: tuple[tuple[str, str, Any], ...]
    hf_model_type: str  # `vision_config.model_type` of an HF config
    hf_config: Mapping[str, Any]  # the further fixed keys of an HF `vision_config` for it
    upstream_prefix: str  # where upstream's state dict keeps the tower's tensors
    hf_prefix: str  # where HF llava-onevision's keeps them
    source_prefixes: tuple[str, ...]  # regexes of other spellings of upstream_prefix (HF, transformers v5)
    # (key under upstream_prefix, our path under "vision/", transform in convert/keys.py), in upstream state-dict
    # order. In both: {i} is the layer index (our stacked "layers" axis), {a|b} a choice made the same in both.
    key_rules: tuple[tuple[str, str, str], ...]
    unused_keys: tuple[tuple[str, str], ...]  # (regex under upstream_prefix, why upstream never reads it)
    layer_key: str  # regex under upstream_prefix whose group 1 is a layer: layers past the selected one are skipped
    # (key under hf_prefix, fill): (hidden_size,) tensors HF's module has and LLaVA never applies; the HF export
    # writes them with that constant so the HF model loads without missing keys
    hf_identity_tensors: tuple[tuple[str, float], ...]
    # regexes of its parameters (under "vision/") that are torch LayerNorm weights: upstream's Trainer excludes
    # them, like every bias, from weight decay (train/optim.py)
    no_weight_decay: tuple[str, ...]
    preprocessing: Preprocessing


SIGLIP = VisionTower(
    family="siglip",
    title="SigLIP",
    module="llavaction_jax.model.siglip",
    claims="siglip",  # upstream's build_vision_tower: `"siglip" in vision_tower`
    sizes={
        "google/siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_layers=27,
                                                 num_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6),
    },
    config_keys=(  # transformers' SiglipVisionConfig defaults (diffed hub configs omit keys at their default)
        ("hidden_size", "hidden_size", 768),
        ("intermediate_size", "intermediate_size", 3072),
        ("num_layers", "num_hidden_layers", 12),
        ("num_heads", "num_attention_heads", 12),
        ("image_size", "image_size", 224),
        ("patch_size", "patch_size", 16),
        ("num_channels", "num_channels", 3),
        ("layer_norm_eps", "layer_norm_eps", 1e-6),
    ),
    hf_model_type="siglip_vision_model",
    hf_config={"hidden_act": "gelu_pytorch_tanh", "vision_use_head": False},
    upstream_prefix="model.vision_tower.vision_tower.vision_model.",
    hf_prefix="vision_tower.vision_model.",
    source_prefixes=(r"(?:model\.)?vision_tower\.vision_model\.", r"(?:model\.)?vision_tower\."),
    key_rules=(  # upstream's SigLipVisionModel (llavaction/model/multimodal_encoder/siglip_encoder.py)
        ("embeddings.patch_embedding.weight", "patch_embed/kernel", "conv"),
        ("embeddings.patch_embedding.bias", "patch_embed/bias", "same"),
        ("embeddings.position_embedding.weight", "pos_embed", "same"),
        ("encoder.layers.{i}.self_attn.{q|k|v}_proj.weight", "layers/attn/{q|k|v}/kernel", "transpose"),
        ("encoder.layers.{i}.self_attn.{q|k|v}_proj.bias", "layers/attn/{q|k|v}/bias", "same"),
        ("encoder.layers.{i}.self_attn.out_proj.weight", "layers/attn/o/kernel", "transpose"),
        ("encoder.layers.{i}.self_attn.out_proj.bias", "layers/attn/o/bias", "same"),
        ("encoder.layers.{i}.layer_norm{1|2}.weight", "layers/ln{1|2}/scale", "same"),
        ("encoder.layers.{i}.layer_norm{1|2}.bias", "layers/ln{1|2}/bias", "same"),
        ("encoder.layers.{i}.mlp.{fc1|fc2}.weight", "layers/mlp/{fc1|fc2}/kernel", "transpose"),
        ("encoder.layers.{i}.mlp.{fc1|fc2}.bias", "layers/mlp/{fc1|fc2}/bias", "same"),
    ),
    # upstream's SigLipVisionTower.load_model deletes the last encoder layer and the pooling head, and LLaVA reads
    # a hidden state before post_layernorm; position_ids is a buffer
    unused_keys=(
        (r"post_layernorm\.", "SigLIP post_layernorm, never applied (LLaVA reads a hidden state before it)"),
        (r"head\.", "SigLIP pooling head, never used by LLaVA"),
        (r"embeddings\.position_ids$", "a buffer, not a weight"),
    ),
    layer_key=r"encoder\.layers\.(\d+)\.",
    hf_identity_tensors=(("post_layernorm.weight", 1.0), ("post_layernorm.bias", 0.0)),
    no_weight_decay=(r"layers/ln[12]/",),
    # upstream's SigLipImageProcessor (siglip_encoder.py): bicubic resize, x/255, mean = std = 0.5
    preprocessing=Preprocessing(resample="bicubic", rescale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
)

TOWERS: dict[str, VisionTower] = {SIGLIP.family: SIGLIP}
DEFAULT_FAMILY = SIGLIP.family  # the tower of names no entry claims (module docstring)
DEFAULT_TOWER_NAME = "google/siglip-so400m-patch14-384"  # LLaVA-Video's and LLaVAction's (ModelConfig's default)


def register(tower: VisionTower) -> VisionTower:
    """Add `tower` to the registry (refused when its family or one of its hub names is taken)."""
    if tower.family in TOWERS:
        raise ValueError(f"a vision tower {tower.family!r} is already registered")
    taken = sorted(set(tower.sizes) & set(known_sizes()))
    if taken:
        raise ValueError(f"vision tower names {taken} already belong to another registered tower")
    TOWERS[tower.family] = tower
    return tower


def lookup(name: str) -> VisionTower:
    """The tower a model whose config names `name` (`ModelConfig.vision_tower`) runs (module docstring); a
    family name ("siglip", what an HF import without a hub name records) names its tower too."""
    if name in TOWERS:
        return TOWERS[name]
    for tower in TOWERS.values():
        if name in tower.sizes:
            return tower
    for tower in TOWERS.values():
        if re.search(tower.claims, name):
            return tower
    return TOWERS[DEFAULT_FAMILY]


def by_hf_model_type(model_type: str | None) -> VisionTower:
    """The tower of an HF `vision_config` with this `model_type` (the default tower when none matches)."""
    return next((t for t in TOWERS.values() if t.hf_model_type == model_type), TOWERS[DEFAULT_FAMILY])


def known_sizes() -> dict[str, Mapping[str, Any]]:
    """Every registered tower's released checkpoints: hub name -> VisionConfig fields (whole depth)."""
    return {name: size for tower in TOWERS.values() for name, size in tower.sizes.items()}
