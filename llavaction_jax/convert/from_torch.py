"""Import: a PyTorch checkpoint directory (config.json + safetensors) -> our Orbax model directory.

Source layouts: the upstream LLaVA-NeXT / LLaVAction one (`model_type` qwen2 with `architectures`
LlavaQwenForCausalLM, as released, or llava_qwen / llava; needs `mm_vision_tower`) and the HF llava-onevision one
(`model_type` llava_onevision with `text_config` and `vision_config`, hub or transformers v5 key names).

Streaming: a plan maps every source tensor onto one of our parameters (stacked decoder layers included) and checks
names and shapes against the config before anything is read. Parameters are then built one at a time with
`jax.make_array_from_callback`: each device's callback reads just its slice of each per-layer tensor (sliced
safetensors reads) into a buffer the array then aliases. Each parameter (or group of small ones up to
GROUP_BYTES) is added to one Orbax checkpoint with Orbax's partial save, which copies it once to write it, so peak
host memory is about twice the largest stacked parameter, not the model (bench/convert.py measures it). On a pod
(`jax.distributed` + a mesh) each process reads only the slices its devices hold and holds only those, and all
processes write the one checkpoint together.

Vocabulary: every embedding row is kept (152064 for 7B). Upstream shrinks `embed_tokens` / `lm_head` to
`len(tokenizer)` = 151646 at load (upstream-spec.md 1.12); pass `vocab_limit=151646` to `LlavaModel.__call__` /
`llava.forward` to slice logits the same way (evaluation does), which only matters if argmax would land in the
untrained padding rows.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax import checkpoint_io
from llavaction_jax.config import ModelConfig
from llavaction_jax.convert.import_plan import (PERMS, Param, Plan, Source, describe, detect_layout, is_torch_dir,
                                                open_source, plan_import, torch_shape)
from llavaction_jax.convert.keys import ConversionError
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint, SafetensorsError
from llavaction_jax.model.params import unflatten_paths

# Copied verbatim next to our checkpoint: the original config, the tokenizer, generation and processor settings.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                "video_preprocessor_config.json")  # fmt: skip
GROUP_BYTES = 256 * 2**20  # small parameters are saved together, up to this many bytes per Orbax partial save
_SCRATCH = "params.import-in-progress"  # no leading dot: Orbax globs for its pending saves


# ---------------------------------------------------------------------------------------------- reading
def read_param(tensors: SafetensorsCheckpoint, p: Param, index: tuple[slice, ...], dtype) -> np.ndarray:
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


def param_shardings(plan: Plan, mesh) -> dict:
    from jax.sharding import NamedSharding, SingleDeviceSharding

    from llavaction_jax.sharding import logical_to_pspec

    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return {path: device for path in plan.params}
    return {path: NamedSharding(mesh, logical_to_pspec(p.axes, p.shape, mesh)) for path, p in plan.params.items()}


def make_array(tensors: SafetensorsCheckpoint, p: Param, sharding, dtype, on_read=lambda: None) -> jax.Array:
    """One global array; each addressable device's callback reads its own slice (replicas share one read)."""
    cache: dict[tuple, np.ndarray] = {}

    def read(index):
        k = tuple(s.indices(n)[:2] for s, n in zip(index, p.shape))
        if k not in cache:
            cache[k] = read_param(tensors, p, index, dtype)
            on_read()
        return cache[k]

    return jax.make_array_from_callback(p.shape, sharding, read)


def output_dtype(plan: Plan, dtype: str | None) -> tuple[dict[str, np.dtype], str]:
    """Per-parameter dtypes (kept, or all cast to `dtype`) and the config's param_dtype (the dominant one)."""
    if dtype is not None:
        d = np.dtype(jnp.dtype(dtype))
        return {path: d for path in plan.params}, d.name
    per = {path: np.dtype(p.dtype) for path, p in plan.params.items()}
    weight: dict[str, int] = {}
    for path, p in plan.params.items():
        weight[per[path].name] = weight.get(per[path].name, 0) + int(np.prod(p.shape))
    return per, max(weight, key=weight.get)


def _progress(total: int | None, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled or jax.process_index() != 0)


def load_torch(src, mesh=None, dtype: str | None = None, vision_config=None, progress: bool = False):
    """(ModelConfig, params) of a PyTorch checkpoint directory, converted in memory (sharded over `mesh`)."""
    source = open_source(src, vision_config)
    with source.tensors:
        plan = plan_import(source)
        plan.raise_if_problems()
        dtypes, param_dtype = output_dtype(plan, dtype)
        shardings = param_shardings(plan, mesh)
        bar = _progress(plan.nbytes(), progress, "reading")
        flat = {}
        for path, p in plan.params.items():
            flat[path] = make_array(source.tensors, p, shardings[path], dtypes[path], _updater(bar, source.tensors))
        bar.close()
    return source.cfg.replace(param_dtype=param_dtype), unflatten_paths(flat)


def _updater(bar, tensors):
    last = [tensors.bytes_read]

    def update():
        bar.update(tensors.bytes_read - last[0])
        last[0] = tensors.bytes_read

    return update


# --------------------------------------------------------------------------------------------- importing
@dataclasses.dataclass
class ImportReport:
    cfg: ModelConfig  # as written to llavaction_config.json
    plan: Plan
    bytes_read: int  # by this process (on a pod: only its devices' slices)


def import_checkpoint(src, dst, dtype: str | None = None, vision_config=None, mesh=None, progress: bool = True,
                      compress: bool = False, group_bytes: int = GROUP_BYTES) -> ImportReport:
    """Convert `src` (PyTorch) into the model directory `dst` (new).

    `compress` zstd-compresses the stored arrays (Orbax's default for training checkpoints): smaller files for
    real weights, but on the benchmark machine the write was ~4x slower and held one more copy of the parameter
    being written. Both kinds restore the same way.

    Under `jax.distributed` every process calls this with the same arguments and a mesh over all devices.
    """
    from jax.experimental import multihost_utils
    from orbax.checkpoint.experimental import v1 as ocp_v1
    from orbax.checkpoint.experimental.v1 import partial

    if jax.process_count() > 1 and mesh is None:
        raise ValueError("under jax.distributed every process must pass the same mesh over all devices (--mesh)")
    source = open_source(src, vision_config)
    plan = plan_import(source)
    plan.raise_if_problems()
    dst = pathlib.Path(dst).absolute()
    if (dst / checkpoint_io.PARAMS_DIR).exists() or (dst / checkpoint_io.CONFIG_FILE).exists():
        raise FileExistsError(f"{dst} already holds a converted model; refusing to overwrite it")
    dtypes, param_dtype = output_dtype(plan, dtype)
    cfg = source.cfg.replace(param_dtype=param_dtype)
    scratch = dst / _SCRATCH
    if jax.process_index() == 0:
        dst.mkdir(parents=True, exist_ok=True)
        for stale in dst.glob(_SCRATCH + "*"):  # left by an interrupted run of this command
            shutil.rmtree(stale)
    multihost_utils.sync_global_devices("llavaction_import_start")

    shardings = param_shardings(plan, mesh)
    bar = _progress(plan.nbytes() if jax.process_count() == 1 else None, progress, "converting")
    update = _updater(bar, source.tensors)
    context = ocp_v1.Context()
    context.array.saving.use_compression = compress
    with source.tensors, context:
        for group in _groups(plan, dtypes, group_bytes):
            # The arrays alias the buffers read_param fills (zero-copy on CPU); Orbax copies them once to write.
            arrays = {path: make_array(source.tensors, plan.params[path], shardings[path], dtypes[path], update)
                      for path in group}
            partial.save(scratch, unflatten_paths(arrays))
            del arrays
        partial.finalize(scratch)
    bar.close()
    if jax.process_index() == 0:
        _install_params(scratch, dst / checkpoint_io.PARAMS_DIR)
        cfg.save(dst / checkpoint_io.CONFIG_FILE)
        for name in COPIED_FILES:
            if (source.directory / name).is_file():
                shutil.copyfile(source.directory / name, dst / name)
    multihost_utils.sync_global_devices("llavaction_import_done")
    return ImportReport(cfg, plan, source.tensors.bytes_read)


def _groups(plan: Plan, dtypes: dict, limit: int) -> list[list[str]]:
    groups, size = [[]], 0
    for path, p in plan.params.items():
        n = int(np.prod(p.shape)) * dtypes[path].itemsize
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += n
    return groups


def _install_params(finalized: pathlib.Path, params_dir: pathlib.Path) -> None:
    """Move the finalized pytree to `params/`, the layout `checkpoint_io.restore_params` reads."""
    import orbax.checkpoint as ocp

    (finalized / "state").rename(params_dir)
    meta = json.loads((finalized / "_CHECKPOINT_METADATA").read_text())
    handler = ocp.StandardCheckpointHandler
    meta["item_handlers"] = f"{handler.__module__}.{handler.__qualname__}"  # what a plain save_model writes
    (params_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    if (finalized / "commit_success.txt").is_file():
        shutil.copyfile(finalized / "commit_success.txt", params_dir / "commit_success.txt")
    shutil.rmtree(finalized)


__all__ = ["import_checkpoint", "ImportReport", "load_torch", "read_param", "copy_into", "COPIED_FILES",
           # re-exported from import_plan: the plan is part of this command's API
           "Source", "Param", "Plan", "open_source", "plan_import", "describe", "detect_layout", "is_torch_dir",
           "torch_shape", "PERMS", "ConversionError", "SafetensorsError"]
