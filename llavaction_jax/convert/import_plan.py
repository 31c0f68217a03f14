"""Import plan: which source tensor becomes which of our parameters, checked before anything is read.

`open_source` reads config.json, picks the layout and resolves the vision tower; `plan_import` maps every
tensor of the safetensors files (any supported key spelling, via `keys.normalise_key`) onto our parameter
paths, one source tensor per layer for stacked parameters, and collects every problem at once: missing,
unexpected and duplicate keys, and shapes that disagree with the config, each naming the key and its file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from llavaction_jax.config import ConfigError, ModelConfig
from llavaction_jax.convert.keys import CONV, T, ConversionError, is_unused, map_key, normalise_key, upstream_keys
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint
from llavaction_jax.model import llava
from llavaction_jax.model.params import flatten_paths

UPSTREAM_MODEL_TYPES = ("qwen2", "llava_qwen", "llava")
HF_MODEL_TYPES = ("llava_onevision",)
# ours = torch.transpose(PERM); a SAME tensor has no permutation.
PERMS = {T: (1, 0), CONV: (2, 3, 1, 0)}


# ------------------------------------------------------------------------------------------------- source
@dataclasses.dataclass
class Source:
    directory: pathlib.Path
    raw_config: dict
    layout: str  # "upstream" or "hf-onevision"
    cfg: ModelConfig
    tensors: SafetensorsCheckpoint


def is_torch_dir(path) -> bool:
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def detect_layout(raw: dict, file: pathlib.Path) -> str:
    model_type, arch = raw.get("model_type"), raw.get("architectures")
    if (raw.get("mm_vision_tower") or raw.get("vision_tower")) and model_type in UPSTREAM_MODEL_TYPES:
        return "upstream"
    if "text_config" in raw and "vision_config" in raw and model_type in HF_MODEL_TYPES:
        text_type = raw["text_config"].get("model_type", "qwen2")
        if text_type != "qwen2":
            raise ConversionError(f"{file}: HF llava-onevision with a {text_type!r} language model; only qwen2 is supported")
        return "hf-onevision"
    raise ConversionError(
        f"{file}: unknown layout (model_type={model_type!r}, architectures={arch!r}). Expected the upstream "
        f"LLaVA-NeXT/LLaVAction layout (model_type one of {UPSTREAM_MODEL_TYPES} with 'mm_vision_tower') or HF "
        f"llava-onevision (model_type 'llava_onevision' with 'text_config' and 'vision_config').")


def open_source(src, vision_config: str | pathlib.Path | dict | None = None) -> Source:
    """Read config.json, pick the layout, resolve the vision tower and index the safetensors files."""
    directory = pathlib.Path(src)
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a PyTorch checkpoint directory needs config.json + safetensors")
    raw = json.loads(file.read_text())
    layout = detect_layout(raw, file)
    if isinstance(vision_config, (str, pathlib.Path)):
        vision_config = json.loads(pathlib.Path(vision_config).read_text())
    try:
        cfg = ModelConfig.from_upstream(raw, vision=vision_config if layout == "upstream" else None)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return Source(directory, raw, layout, cfg, SafetensorsCheckpoint(directory))


# --------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Param:
    """One of our parameters and the source tensors it is made of (one per layer when stacked)."""

    path: str
    shape: tuple[int, ...]
    axes: tuple
    transform: str
    stacked: bool
    keys: list[str | None]
    dtype: np.dtype | None = None

    def torch_shape(self) -> tuple[int, ...]:
        """Shape of each source tensor."""
        return torch_shape(self.shape[1:] if self.stacked else self.shape, self.transform)


def torch_shape(ours: tuple[int, ...], transform: str) -> tuple[int, ...]:
    perm = PERMS.get(transform)
    if perm is None:
        return tuple(ours)
    out = [0] * len(ours)
    for k, p in enumerate(perm):
        out[p] = ours[k]
    return tuple(out)


@dataclasses.dataclass
class Plan:
    params: dict[str, Param]
    skipped: list[tuple[str, str]]  # (source key, why it is not imported)
    problems: list[str]

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConversionError("cannot convert this checkpoint:\n  " + "\n  ".join(self.problems))

    def nbytes(self, dtype=None) -> int:
        return sum(int(np.prod(p.shape)) * np.dtype(dtype or p.dtype).itemsize for p in self.params.values())


def plan_import(source: Source) -> Plan:
    """Map every source tensor; collect missing, unexpected, duplicate and mis-shaped keys (all of them)."""
    cfg, tensors = source.cfg, source.tensors
    specs = flatten_paths(llava.param_specs(cfg))
    upstream_name = {}  # (our path, layer) -> upstream key, to name what is missing
    for key in upstream_keys(cfg):
        path, layer, _ = map_key(key)
        upstream_name[path, layer] = key
    params: dict[str, Param] = {}
    for path, spec in specs.items():
        stacked = bool(spec.axes) and spec.axes[0] == "layers"
        tf = map_key(upstream_name[path, 0 if stacked else None])[2]
        params[path] = Param(path, spec.shape, spec.axes, tf, stacked, [None] * (spec.shape[0] if stacked else 1))
    skipped, unexpected, problems = [], [], []
    for key in tensors.keys():
        norm = normalise_key(key)
        mapped = map_key(norm)
        if is_unused(norm, cfg):
            skipped.append((key, _why_unused(norm)))
            continue
        if mapped is None or mapped[0] not in params:
            if norm == "lm_head.weight" and cfg.text.tie_word_embeddings:
                skipped.append((key, "tie_word_embeddings: the output layer reuses embed_tokens"))
            else:
                unexpected.append(key)
            continue
        path, layer, _ = mapped
        p = params[path]
        slot = layer if p.stacked else 0
        if slot >= len(p.keys):
            unexpected.append(key)
        elif p.keys[slot] is not None:
            problems.append(f"duplicate: {key!r} and {p.keys[slot]!r} both map to {path}" + (f" layer {layer}" if p.stacked else ""))
        else:
            p.keys[slot] = key
    for p in params.values():
        want = p.torch_shape()
        for key in p.keys:
            if key is not None and tensors.entries[key].shape != want:
                e = tensors.entries[key]
                problems.append(f"shape mismatch: {key!r} in {e.file.name} is {list(e.shape)}, the config expects "
                                f"{list(want)} (our {p.path})")
        present = [tensors.entries[k].dtype for k in p.keys if k is not None]
        p.dtype = np.result_type(*present) if present else None
    if unexpected:
        supervision = [k for k in unexpected if re.search(r"(verb|noun|action)_head\.|action_supervision", k)]
        hint = " (the config has no vision_supervision, so no heads / action token)" if supervision and cfg.vision_supervision is None else ""
        problems.append(f"unexpected keys{hint}: {_abbrev(unexpected)}")
    missing = [upstream_name[p.path, i if p.stacked else None] for p in params.values()
               for i, k in enumerate(p.keys) if k is None]
    if missing:
        names = "upstream names" if source.layout == "upstream" else "upstream names; HF spellings are mapped onto these"
        problems.append(f"missing keys ({names}): {_abbrev(missing)}")
    return Plan(params, skipped, problems)


def _why_unused(key: str) -> str:
    if "post_layernorm" in key:
        return "SigLIP post_layernorm, never applied (LLaVA reads a hidden state before it)"
    if ".head." in key:
        return "SigLIP pooling head, never used by LLaVA"
    if ".encoder.layers." in key:
        return "SigLIP layer past mm_vision_select_layer (upstream deletes it)"
    return "a buffer, not a weight"


def _abbrev(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def describe(source: Source, plan: Plan) -> list[str]:
    """The human-readable key mapping printed by `convert from-torch --check`."""
    lines = [f"source: {source.directory} ({source.layout} layout, {len(source.tensors.files)} file(s), "
             f"{source.tensors.total_bytes / 1e9:.3f} GB)"]
    for p in plan.params.values():
        first = next((k for k in p.keys if k is not None), "<missing>")
        if p.stacked:
            first = re.sub(r"\.layers\.\d+\.", f".layers.{{0..{len(p.keys) - 1}}}.", first, count=1)
        dtype = np.dtype(p.dtype).name if p.dtype is not None else "?"
        lines.append(f"  {p.path:<36} {str(list(p.shape)):<22} {dtype:<9} <- {first}" + ("" if p.transform == "same" else f" [{p.transform}]"))
    for key, why in plan.skipped:
        lines.append(f"  skipped {key}: {why}")
    lines += [f"PROBLEM {x}" for x in plan.problems] or ["no problems"]
    return lines
