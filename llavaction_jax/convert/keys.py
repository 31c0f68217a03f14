"""Key tables between PyTorch state dicts and our params tree.

Every source layout is first normalised to the upstream LLaVA-NeXT / LLaVAction key names
(upstream-spec.md 1.11); one regex table then maps those onto our parameter paths. Per-layer tensors land in
stacked arrays (leading "layers" axis). Linear weights are [out, in] in torch and [in, out] here; the patch
conv is [out, in, kh, kw] in torch and [kh, kw, in, out] here.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np

from llavaction_jax.config import ModelConfig

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# Source-layout prefixes -> upstream prefixes (first match wins). Covers the HF llava-onevision checkpoint
# (`vision_tower.vision_model.*`, `language_model.model.*`, `multi_modal_projector.linear_{1,2}`), the
# transformers v5 in-memory / saved names (`model.language_model.*`, `model.vision_tower.*`), and the
# upstream layout itself.
_NORMALISE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?vision_tower\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\."), "model.mm_projector.{proj}."),
    (re.compile(r"^(?:model\.)?image_newline$"), "model.image_newline"),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
]


def normalise_key(key: str) -> str:
    """Any supported source key -> the upstream LLaVA-NeXT key."""
    for pattern, repl in _NORMALISE:
        m = pattern.match(key)
        if m:
            if "{proj}" in repl:  # HF linear_k is Sequential index 2 * (k - 1)
                repl = repl.format(proj=2 * (int(m.group(1)) - 1))
            return repl + key[m.end():]
    return key


T = "transpose"  # Linear [out, in] -> kernel [in, out]
CONV = "conv"  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
SAME = "same"

# (upstream key regex, our path template, transform). `{i}` is the layer index (stacked axis).
RULES: list[tuple[str, str, str]] = [
    (r"model\.embed_tokens\.weight", "text/embed", SAME),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", "text/layers/attn/{1}/kernel", T),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", "text/layers/attn/{1}/bias", SAME),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "text/layers/attn/o/kernel", T),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "text/layers/mlp/{1}/kernel", T),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "text/layers/input_norm/scale", SAME),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "text/layers/post_norm/scale", SAME),
    (r"model\.norm\.weight", "text/final_norm/scale", SAME),
    (r"lm_head\.weight", "text/lm_head", T),
    (r"V:embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", CONV),
    (r"V:embeddings\.patch_embedding\.bias", "vision/patch_embed/bias", SAME),
    (r"V:embeddings\.position_embedding\.weight", "vision/pos_embed", SAME),
    (r"V:encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", "vision/layers/attn/{1}/kernel", T),
    (r"V:encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", "vision/layers/attn/{1}/bias", SAME),
    (r"V:encoder\.layers\.(\d+)\.self_attn\.out_proj\.weight", "vision/layers/attn/o/kernel", T),
    (r"V:encoder\.layers\.(\d+)\.self_attn\.out_proj\.bias", "vision/layers/attn/o/bias", SAME),
    (r"V:encoder\.layers\.(\d+)\.layer_norm([12])\.weight", "vision/layers/ln{1}/scale", SAME),
    (r"V:encoder\.layers\.(\d+)\.layer_norm([12])\.bias", "vision/layers/ln{1}/bias", SAME),
    (r"V:encoder\.layers\.(\d+)\.mlp\.(fc[12])\.weight", "vision/layers/mlp/{1}/kernel", T),
    (r"V:encoder\.layers\.(\d+)\.mlp\.(fc[12])\.bias", "vision/layers/mlp/{1}/bias", SAME),
    (r"model\.mm_projector\.(\d+)\.weight", "projector/fc{p}/kernel", T),
    (r"model\.mm_projector\.(\d+)\.bias", "projector/fc{p}/bias", SAME),
    (r"model\.image_newline", "image_newline", SAME),
    (r"model\.action_supervision", "action_tokens", SAME),
    (r"(verb|noun|action)_head\.weight", "heads/{0}/kernel", T),
]
_COMPILED = [(re.compile("^" + rx.replace("V:", re.escape(VISION_PREFIX)) + "$"), path, tf) for rx, path, tf in RULES]

# Keys that exist in some checkpoints but that upstream never reads (spec 1.2, 1.11).
UNUSED = [
    re.compile(re.escape(VISION_PREFIX) + r"post_layernorm\."),
    re.compile(re.escape(VISION_PREFIX) + r"head\."),
    re.compile(r".*\.rotary_emb\.inv_freq$"),
    re.compile(re.escape(VISION_PREFIX) + r"embeddings\.position_ids$"),
]


class ConversionError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0])


def map_key(key: str) -> tuple[str, int | None, str] | None:
    """Upstream key -> (our path, layer index or None, transform), or None if no rule matches."""
    for rx, path, tf in _COMPILED:
        m = rx.match(key)
        if not m:
            continue
        groups = m.groups()
        if "{p}" in path:  # projector Sequential index 0, 2, 4, ... -> fc1, fc2, fc3
            return path.replace("{p}", str(int(groups[0]) // 2 + 1)), None, tf
        layer = int(groups[0]) if "/layers/" in path else None
        return path.format(*groups), layer, tf
    return None


def to_ours(tensor: np.ndarray, transform: str) -> np.ndarray:
    if transform == T:
        return tensor.T
    if transform == CONV:
        return tensor.transpose(2, 3, 1, 0)
    return tensor


def to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == T:
        return array.T
    if transform == CONV:
        return array.transpose(3, 2, 0, 1)
    return array


def is_unused(key: str, cfg: ModelConfig) -> bool:
    """Present-but-unused keys: post_layernorm / head, buffers, and SigLIP layers past the selected one."""
    if any(p.match(key) for p in UNUSED):
        return True
    m = re.match(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.vision.num_layers


def torch_to_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, expected=None,
                    cast: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> dict:
    """An in-memory state dict (any supported layout) -> our params tree, with errors that name the keys.

    `expected` is the spec tree (llava.param_specs(cfg)); tied checkpoints have no lm_head and the 0.5B
    LLaVAction has none either. Shapes are checked against the config.
    """
    from llavaction_jax.model import llava
    from llavaction_jax.model.params import check_shapes, flatten_paths, unflatten_paths

    expected = llava.param_specs(cfg) if expected is None else expected
    want = flatten_paths(expected)
    flat: dict[str, object] = {}
    layers: dict[str, dict[int, np.ndarray]] = {}
    unexpected = []
    for key in state:
        norm = normalise_key(key)
        mapped = map_key(norm)
        if mapped is None or mapped[0] not in want:
            if is_unused(norm, cfg):
                continue
            if norm == "lm_head.weight" and cfg.text.tie_word_embeddings:
                continue  # HF saves a copy of the tied table; ours reuses text/embed
            unexpected.append(key)
            continue
        path, layer, tf = mapped
        value = cast(to_ours(np.asarray(state[key]), tf))
        if layer is None:
            flat[path] = value
        else:
            layers.setdefault(path, {})[layer] = value
    if unexpected:
        raise ConversionError(f"unexpected keys for this config: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for path, per_layer in layers.items():
        n = want[path].shape[0]
        missing = [i for i in range(n) if i not in per_layer]
        if missing:
            raise ConversionError(f"missing layers {missing} for {path}")
        flat[path] = np.stack([per_layer[i] for i in range(n)])
    missing = sorted(set(want) - set(flat))
    if missing:
        raise ConversionError(f"missing keys (our paths): {missing}")
    params = unflatten_paths(flat)
    check_shapes(expected, params, where="checkpoint")
    return params


def upstream_keys(cfg: ModelConfig) -> Iterable[str]:
    """The upstream state-dict keys of a model with this config (upstream-spec.md 1.11)."""
    yield "model.embed_tokens.weight"
    for i in range(cfg.text.num_layers):
        pre = f"model.layers.{i}."
        for n in "qkv":
            yield pre + f"self_attn.{n}_proj.weight"
            yield pre + f"self_attn.{n}_proj.bias"
        yield pre + "self_attn.o_proj.weight"
        for n in ("gate", "up", "down"):
            yield pre + f"mlp.{n}_proj.weight"
        yield pre + "input_layernorm.weight"
        yield pre + "post_attention_layernorm.weight"
    yield "model.norm.weight"
    yield VISION_PREFIX + "embeddings.patch_embedding.weight"
    yield VISION_PREFIX + "embeddings.patch_embedding.bias"
    yield VISION_PREFIX + "embeddings.position_embedding.weight"
    for j in range(cfg.vision.num_layers):
        pre = VISION_PREFIX + f"encoder.layers.{j}."
        for n in ("q", "k", "v", "out"):
            yield pre + f"self_attn.{n}_proj.weight"
            yield pre + f"self_attn.{n}_proj.bias"
        for n in ("layer_norm1", "layer_norm2"):
            yield pre + f"{n}.weight"
            yield pre + f"{n}.bias"
        for n in ("fc1", "fc2"):
            yield pre + f"mlp.{n}.weight"
            yield pre + f"mlp.{n}.bias"
    for d in range(cfg.projector_depth):
        yield f"model.mm_projector.{2 * d}.weight"
        yield f"model.mm_projector.{2 * d}.bias"
    if cfg.has_image_newline:
        yield "model.image_newline"
    if cfg.num_action_tokens:
        yield "model.action_supervision"
    if not cfg.text.tie_word_embeddings:
        yield "lm_head.weight"
    if cfg.vision_supervision is not None:
        for n in ("verb", "noun", "action"):
            yield f"{n}_head.weight"
