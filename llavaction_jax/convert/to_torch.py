"""Export: our model directory -> PyTorch safetensors + config.json, so fine-tuned models go back to PyTorch.

`layout="upstream"` writes the LLaVA-NeXT / LLaVAction state dict (upstream-spec.md 1.11) and a config.json that
upstream's `load_pretrained_model` reads (model_type qwen2, LlavaQwenForCausalLM); `layout="hf-onevision"` writes
what `transformers.LlavaOnevisionForConditionalGeneration.from_pretrained` reads (one_token models only).

Streaming: every output file's header is written first (names, shapes and dtypes are known from the config and
the Orbax metadata), then one parameter at a time is restored and its per-layer tensors are written in place, so
memory is about twice the largest stacked parameter (Orbax restore peak). Files above `max_shard_bytes` are split into
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`. Dtypes are the stored ones.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from llavaction_jax import checkpoint_io
from llavaction_jax.config import VISION_TOWER_PRESETS, ModelConfig, vision_from_hf
from llavaction_jax.convert import hf_onevision
from llavaction_jax.convert.from_torch import COPIED_FILES, copy_into
from llavaction_jax.convert.import_plan import detect_layout, torch_shape
from llavaction_jax.convert.keys import ConversionError, map_key, to_torch, upstream_keys
from llavaction_jax.convert.safetensors_io import (SafetensorsWriter, TensorSpec, plan_shards, shard_names,
                                                   write_index)
from llavaction_jax.model import llava
from llavaction_jax.model.params import flatten_paths, unflatten_paths

LAYOUTS = ("upstream", "hf-onevision")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def stored_params(model_dir: pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{our path: (shape, dtype)} from the Orbax metadata, without reading any array."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(model_dir.absolute() / checkpoint_io.PARAMS_DIR)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten_paths(dict(tree)).items()}


def restore_param(model_dir: pathlib.Path, path: str, shape, dtype) -> np.ndarray:
    """One parameter of the Orbax checkpoint as numpy (partial restore: nothing else is read).

    Restoring as np.ndarray rather than jax.Array keeps one copy alive instead of two (measured).
    """
    import orbax.checkpoint as ocp

    item = unflatten_paths({path: np.zeros((), dtype)})
    args = unflatten_paths({path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
    out = ocp.PyTreeCheckpointer().restore(model_dir.absolute() / checkpoint_io.PARAMS_DIR,
                                           args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    value = flatten_paths(out)[path]
    if value.shape != tuple(shape):
        raise ConversionError(f"{model_dir}: {path} restored as {value.shape}, its metadata says {tuple(shape)}")
    return value


def export_table(cfg: ModelConfig, stored: dict) -> list[tuple[str, str, int | None, str]]:
    """(upstream key, our path, layer, transform) for every tensor, with errors naming mismatched params."""
    specs = flatten_paths(llava.param_specs(cfg))
    problems = [f"missing parameter {p}" for p in specs if p not in stored]
    problems += [f"{p} is stored as {list(stored[p][0])}, the config expects {list(s.shape)}"
                 for p, s in specs.items() if p in stored and stored[p][0] != s.shape]
    problems += [f"unexpected parameter {p}" for p in stored if p not in specs]
    if problems:
        raise ConversionError("the checkpoint does not match its llavaction_config.json: " + "; ".join(problems))
    return [(key, *map_key(key)) for key in upstream_keys(cfg)]


def export_checkpoint(src, dst, layout: str = "upstream", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True) -> list[pathlib.Path]:
    """Write `dst` (a new directory) from the model directory `src`; returns the safetensors files written."""
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    cfg = checkpoint_io.load_config(src)
    stored = stored_params(src)
    table = export_table(cfg, stored)
    rename, constants = (lambda k: k), {}
    if layout == "hf-onevision":
        hf_onevision.check_exportable(cfg)
        rename, constants = hf_onevision.hf_key, hf_onevision.identity_post_layernorm(cfg)
    specs = []
    for key, path, layer, tf in table:
        shape = stored[path][0][1:] if layer is not None else stored[path][0]
        specs.append(TensorSpec(rename(key), torch_shape(shape, tf), stored[path][1]))
    dtype = stored[table[0][1]][1]
    specs += [TensorSpec(k, shape, dtype) for k, (shape, _) in constants.items()]

    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; refusing to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    files = [dst / name for name in shard_names(len(shards))]
    writers = [SafetensorsWriter(f, shard) for f, shard in zip(files, shards)]
    writer_of = {s.key: w for w, shard in zip(writers, shards) for s in shard}
    by_path: dict[str, list] = {}
    for key, path, layer, tf in table:
        by_path.setdefault(path, []).append((rename(key), layer, tf))
    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="exporting", disable=not progress)
    for path, targets in by_path.items():
        _write_param(restore_param(src, path, *stored[path]), targets, writer_of, bar)
    for key, (shape, fill) in constants.items():
        writer_of[key].write(key, np.full(shape, fill, dtype))
    for w in writers:
        w.close()
    bar.close()
    if len(shards) > 1:
        write_index(dst, shards)

    original = _original_config(src)
    config = hf_onevision.hf_config(cfg) if layout == "hf-onevision" else upstream_config(cfg)
    if original is not None and _layout_of(original) == layout:
        _add_missing(config, original)  # keys we do not model travel back unchanged
    dtype_key = next((k for k in ("torch_dtype", "dtype") if k in config), "torch_dtype")
    config[dtype_key] = np.dtype(dtype).name  # what the tensors are now (an import may have cast them)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return files


def _write_param(value: np.ndarray, targets, writer_of: dict, bar) -> None:
    """Write one restored parameter's tensors (a function, so nothing keeps `value` alive afterwards)."""
    for key, layer, tf in targets:
        view = to_torch(value[layer] if layer is not None else value, tf)
        tensor = np.empty(view.shape, view.dtype)
        copy_into(tensor, view)  # tiled: a transposed copy element by element thrashes the cache
        writer_of[key].write(key, tensor)
        bar.update(tensor.nbytes)


def upstream_config(cfg: ModelConfig) -> dict:
    out = cfg.to_upstream()
    out.pop("hf_onevision", None)  # our record of an imported HF config; meaningless upstream
    if cfg.vision_tower not in VISION_TOWER_PRESETS:
        # An HF-imported tower has no upstream name; upstream loads towers by name, so name a matching preset.
        for name, preset in VISION_TOWER_PRESETS.items():
            if vision_from_hf(preset, out.get("mm_vision_select_layer", -2)) == cfg.vision:
                out["mm_vision_tower"] = name
    return out


def _original_config(src: pathlib.Path) -> dict | None:
    file = src / "config.json"  # the import copies the source's config.json here
    return json.loads(file.read_text()) if file.is_file() else None


def _layout_of(raw: dict) -> str | None:
    try:
        return detect_layout(raw, pathlib.Path("config.json"))
    except ConversionError:
        return None


def _add_missing(ours: dict, original: dict) -> None:
    for key, value in original.items():
        if key not in ours:
            ours[key] = value
        elif isinstance(value, dict) and isinstance(ours[key], dict):
            _add_missing(ours[key], value)
