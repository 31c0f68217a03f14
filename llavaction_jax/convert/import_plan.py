"""The conversion plan: which source tensor becomes which of our parameters, checked before anything is read.

One plan serves every path: `from_torch.load_torch` (a PyTorch directory loaded in memory), the streaming
`from_torch.import_checkpoint`, and `torch_to_params` (a state dict already in memory). `open_source` reads
config.json, picks the layout and resolves the vision tower; `plan_conversion` starts from our parameter specs
(`llava.param_specs(cfg)`), derives the upstream key of every parameter and layer from the rule table
(`keys.targets`), maps every source tensor (any supported spelling, via `keys.normalise_key`) onto them, and
collects every problem at once: missing, unexpected and duplicate keys, and shapes that disagree with the
config, each naming the key and its file. `read_param` then reads any slice of a planned parameter.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Mapping

import numpy as np

from llavaction_jax.config import ConfigError, ModelConfig
from llavaction_jax.convert.keys import (PERMS, ConversionError, map_key, normalise_key, targets, torch_shape,
                                         tower_of, unused_reason)
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint, TensorEntry
from llavaction_jax.convert.upstream_config import from_upstream
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths, unflatten_paths

UPSTREAM_MODEL_TYPES = ("qwen2", "llava_qwen", "llava")
HF_MODEL_TYPES = ("llava_onevision",)


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
        cfg = from_upstream(raw, vision=vision_config if layout == "upstream" else None)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return Source(directory, raw, layout, cfg, SafetensorsCheckpoint(directory))


class ArrayTensors:
    """An in-memory state dict behind the reader interface of `SafetensorsCheckpoint` (entries, read_slice)."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        self._state = {k: np.asarray(v) for k, v in state.items()}
        where = pathlib.Path("<state dict>")
        self.entries = {k: TensorEntry(k, where, v.dtype, v.shape, 0, v.nbytes) for k, v in self._state.items()}
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_slice(self, key: str, index) -> np.ndarray:
        out = self._state[key][tuple(index)]
        self.bytes_read += out.nbytes
        return out


# --------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Param:
    """One of our parameters and the source tensors it is made of (one per layer when stacked)."""

    path: str
    shape: tuple[int, ...]
    axes: tuple
    transform: str
    stacked: bool
    keys: list[str | None]  # the source's key for each layer (None: missing)
    names: tuple[str, ...] = ()  # the upstream key for each layer
    dtype: np.dtype | None = None

    def torch_shape(self) -> tuple[int, ...]:
        """Shape of each source tensor."""
        return torch_shape(self.shape[1:] if self.stacked else self.shape, self.transform)


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
    """The plan for a PyTorch checkpoint directory opened with `open_source`."""
    return plan_conversion(flatten_paths(llava.param_specs(source.cfg)), source.tensors, source.cfg, source.layout)


def plan_conversion(specs: Mapping, tensors, cfg: ModelConfig, layout: str = "upstream") -> Plan:
    """Map every tensor of `tensors` onto the parameters `specs` ({path: ParamSpec}); collect every problem."""
    tower = tower_of(cfg)
    where = targets(specs, tower)
    params = {path: Param(path, spec.shape, spec.axes, where[path].transform, where[path].stacked,
                          [None] * len(where[path].names), where[path].names) for path, spec in specs.items()}
    skipped, unexpected, problems = [], [], []
    for key in tensors.keys():
        norm = normalise_key(key, tower)
        mapped = map_key(norm, tower)
        why_unused = unused_reason(norm, cfg)
        if why_unused is not None:
            skipped.append((key, why_unused))
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
            e = tensors.entries[key] if key is not None else None
            if e is not None and tuple(e.shape) != want:
                problems.append(f"shape mismatch: {key!r} in {e.file.name} is {list(e.shape)}, the config expects "
                                f"{list(want)} (our {p.path})")
        present = [tensors.entries[k].dtype for k in p.keys if k is not None]
        p.dtype = np.result_type(*present) if present else None
    if unexpected:
        supervision = [k for k in unexpected if re.search(r"(verb|noun|action)_head\.|action_supervision", k)]
        hint = " (the config has no vision_supervision, so no heads / action token)" if supervision and cfg.vision_supervision is None else ""
        problems.append(f"unexpected keys{hint}: {_abbrev(unexpected)}")
    missing = [p.names[i] for p in params.values() for i, k in enumerate(p.keys) if k is None]
    if missing:
        names = "upstream names" if layout == "upstream" else "upstream names; HF spellings are mapped onto these"
        problems.append(f"missing keys ({names}): {_abbrev(missing)}")
    return Plan(params, skipped, problems)


def _abbrev(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------------ reading
def read_param(tensors, p: Param, index: tuple[slice, ...], dtype) -> np.ndarray:
    """Our parameter `p`, restricted to `index`, read from its source tensors (only the needed byte runs)."""
    bounds = [(index[d] if d < len(index) else slice(None)).indices(n)[:2] for d, n in enumerate(p.shape)]
    out = np.empty([b - a for a, b in bounds], dtype)
    if p.stacked:
        for j, layer in enumerate(range(*bounds[0])):
            copy_into(out[j], _read_source(tensors, p.keys[layer], bounds[1:], p.transform))
    else:
        copy_into(out, _read_source(tensors, p.keys[0], bounds, p.transform))
    return out


def copy_into(dst: np.ndarray, src: np.ndarray, tile: int = 128) -> None:
    """dst[...] = src (casting if needed), fast for the transposed 2-D views of linear weights.

    A plain strided copy of a transposed matrix misses the cache on every element, and numpy's copy loop for
    ml_dtypes' bfloat16 is slower still; copying same-dtype data as unsigned ints, tile by tile, is ~3x faster.
    """
    if dst.dtype == src.dtype:
        dst, src = dst.view(f"u{dst.dtype.itemsize}"), src.view(f"u{src.dtype.itemsize}")
    if src.ndim != 2 or src.flags.c_contiguous:
        dst[...] = src
        return
    for i in range(0, src.shape[0], tile):
        for j in range(0, src.shape[1], tile):
            dst[i:i + tile, j:j + tile] = src[i:i + tile, j:j + tile]


def _read_source(tensors, key: str, bounds, transform: str) -> np.ndarray:
    perm = PERMS.get(transform)
    if perm is None:
        return tensors.read_slice(key, [slice(a, b) for a, b in bounds])
    torch_index = [slice(None)] * len(bounds)
    for k, p in enumerate(perm):
        torch_index[p] = slice(*bounds[k])
    return tensors.read_slice(key, torch_index).transpose(perm)


def torch_to_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, expected=None, cast=lambda x: x) -> dict:
    """An in-memory state dict (any supported layout) -> our params tree, through the same plan as a checkpoint.

    `expected` is a spec tree (default llava.param_specs(cfg)); tied checkpoints have no lm_head and the 0.5B
    LLaVAction has none either. Names and shapes are checked against the config; errors name the keys.
    """
    tensors = ArrayTensors(state)
    plan = plan_conversion(flatten_paths(llava.param_specs(cfg) if expected is None else expected), tensors, cfg)
    plan.raise_if_problems()
    return unflatten_paths({path: cast(read_param(tensors, p, (), p.dtype)) for path, p in plan.params.items()})


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
