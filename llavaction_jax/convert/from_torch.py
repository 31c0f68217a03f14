"""Import: a PyTorch checkpoint directory (config.json + safetensors) -> our Orbax model directory.

Source layouts: the upstream LLaVA-NeXT / LLaVAction one (`model_type` qwen2 with `architectures`
LlavaQwenForCausalLM, as released, or llava_qwen / llava; needs `mm_vision_tower`) and the HF llava-onevision one
(`model_type` llava_onevision with `text_config` and `vision_config`, hub or transformers v5 key names).

One plan (`import_plan.plan_import`) maps every source tensor onto one of our parameters (stacked decoder layers
included) and checks names and shapes against the config before anything is read. Then:

- `load_torch` builds the parameters in memory with `jax.make_array_from_callback` (each device reads just its
  slice of each per-layer tensor);
- `import_checkpoint` streams them into an Orbax checkpoint (`orbax_stream.save_streamed`): each stored chunk
  (at most a quarter of `buffer_bytes`) is read from the safetensors files and written, with at most
  `buffer_bytes` in flight, so peak memory does not grow with the model (bench/convert.py measures it). On a pod
  (`jax.distributed` + a mesh) each process reads and writes only the chunks of the shards its devices hold, and
  Orbax merges the processes' writes into one checkpoint. Everything is written into a staging folder beside
  the destination and renamed into place at the end (`staging.py`).

Both first verify the source (`source_digests.py`: our checksums.json, else the Hugging Face hub's own digests); a
mismatch stops before anything is read. The converted directory gets a checksums.json only when the source was
verified.

Vocabulary: every embedding row is kept (152064 for 7B). Upstream shrinks `embed_tokens` / `lm_head` to
`len(tokenizer)` = 151646 at load (upstream `llavaction/model/builder.py: load_pretrained_model` resizes the token
embeddings); pass `vocab_limit=151646` to `LlavaModel.__call__` / `llava.forward` to slice logits the same way
(evaluation does), which only matters if argmax would land in the untrained padding rows.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding
from tqdm import tqdm

from llavaction_jax import checkpoint_io, sharding
from llavaction_jax.config import ConfigError, ExecutionConfig, ModelConfig
from llavaction_jax.convert import orbax_stream, source_digests, staging
from llavaction_jax.convert.import_plan import (Param, Plan, Source, copy_into, describe, detect_layout, is_torch_dir,
                                                open_source, plan_import, read_param)
from llavaction_jax.convert.keys import PERMS, ConversionError, torch_row_axis, torch_shape
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint, SafetensorsError, refuse_pickles
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths, unflatten_paths
from llavaction_jax.recipes import configs_with_overrides, model_overrides as parse_model_overrides

# Copied verbatim next to our checkpoint: the original config, the tokenizer, generation and processor settings.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                "video_preprocessor_config.json")  # fmt: skip
DEFAULT_BUFFER_BYTES = orbax_stream.DEFAULT_BUFFER_BYTES


def param_shardings(plan: Plan, mesh) -> dict:
    """{path: sharding} of the plan's parameters: by their logical axes on `mesh`, else the first local device."""
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return {path: device for path in plan.params}
    return sharding.param_shardings(plan.params, mesh, flat=True)


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


def progress_bar(total: int | None, enabled: bool, desc: str):
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled or jax.process_index() != 0)


def load_torch(src, mesh=None, dtype: str | None = None, vision_config=None, progress: bool = False):
    """(ModelConfig, params) of a PyTorch checkpoint directory, converted in memory (sharded over `mesh`)."""
    refuse_pickles(src)
    source_digests.verify_source(src)
    source = open_source(src, vision_config)
    with source.tensors:
        plan = plan_import(source)
        plan.raise_if_problems()
        dtypes, param_dtype = output_dtype(plan, dtype)
        shardings = param_shardings(plan, mesh)
        bar = progress_bar(plan.nbytes(), progress, "reading")
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
    execution: ExecutionConfig  # likewise
    plan: Plan
    bytes_read: int  # by this process (on a pod: only its devices' slices)


def import_checkpoint(src, dst, dtype: str | None = None, vision_config=None, mesh=None, progress: bool = True,
                      compress: bool = False, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                      model_overrides: list[str] = ()) -> ImportReport:
    """Convert `src` (PyTorch) into the model directory `dst` (new, or an empty folder).

    `buffer_bytes` bounds the chunks read but not yet written (peak memory above the interpreter's is about
    twice that). `compress` zstd-compresses the stored arrays (Orbax's default for training checkpoints):
    smaller files for real weights, slower to write. Both kinds restore the same way.

    Under `jax.distributed` every process calls this with the same arguments and a mesh over all devices.
    `model_overrides` (`--config.model.<field>=value`, as in `train` and `eval`) change the written config and
    execution choices; they may not change parameter shapes, and a `param_dtype` override casts like `dtype`.
    """
    if jax.process_count() > 1 and mesh is None:
        raise ValueError("under jax.distributed every process must pass the same mesh over all devices (--mesh)")
    refuse_pickles(src)
    dst = pathlib.Path(dst).absolute()
    staging.check(dst)  # on every process, before any of them waits for the others
    verified = source_digests.verify_source(src)  # before anything is read; every process reads its own copy
    source = open_source(src, vision_config)
    plan = plan_import(source)
    plan.raise_if_problems()
    cfg, execution = overridden(source.cfg, model_overrides)
    if dtype is None and "param_dtype" in parse_model_overrides(list(model_overrides)):
        dtype = cfg.param_dtype
    dtypes, param_dtype = output_dtype(plan, dtype)
    cfg = cfg.replace(param_dtype=param_dtype)
    stage = staging.staging_dir(dst)
    if jax.process_index() == 0:
        staging.begin(dst, f"convert from-torch {source.directory}")
    multihost_utils.sync_global_devices("llavaction_import_start")

    shardings = param_shardings(plan, mesh)
    bar = progress_bar(plan.nbytes() if jax.process_count() == 1 else None, progress, "converting")
    update = _updater(bar, source.tensors)
    tree = {path: _streamed(source.tensors, p, shardings[path], dtypes[path], buffer_bytes, update)
            for path, p in plan.params.items()}
    with source.tensors:
        orbax_stream.save_streamed(stage / checkpoint_io.PARAMS_DIR, unflatten_paths(tree), buffer_bytes, compress)
    bar.close()
    if jax.process_index() == 0:
        cfg.save(stage / checkpoint_io.CONFIG_FILE, execution)
        for name in COPIED_FILES:
            if (source.directory / name).is_file():
                shutil.copyfile(source.directory / name, stage / name)
        staging.commit(stage, dst, manifest=verified)
    multihost_utils.sync_global_devices("llavaction_import_done")
    return ImportReport(cfg, execution, plan, source.tensors.bytes_read)


def overridden(cfg: ModelConfig, overrides: list[str]) -> tuple[ModelConfig, ExecutionConfig]:
    """`cfg` and the default execution choices with `--config.model.<field>=` overrides; refused where they would
    change a parameter's shape."""
    new, execution = configs_with_overrides(cfg, ExecutionConfig(), list(overrides))
    shape = lambda c: {k: s.shape for k, s in flatten_paths(llava.param_specs(c)).items()}
    if shape(new) != shape(cfg):
        changed = sorted(k for k in set(shape(new)) | set(shape(cfg)) if shape(new).get(k) != shape(cfg).get(k))
        raise ConfigError(f"--config.model overrides change the shapes of {len(changed)} parameters of the "
                          f"checkpoint (first: {changed[:3]}); only fields that keep the weights may be overridden")
    return new, execution


def _streamed(tensors, p: Param, sharding, dtype: np.dtype, buffer_bytes: int, on_read) -> orbax_stream.StreamedParam:
    """`p` as a StreamedParam whose stored chunks are cut across layers first, then across torch rows."""
    row = torch_row_axis(len(p.shape) - p.stacked, p.transform) + p.stacked
    priority = ([0] if p.stacked else []) + [row]
    chunk = orbax_stream.chunk_shape(sharding.shard_shape(p.shape), dtype.itemsize, buffer_bytes // 4, priority)

    def read(index):
        out = read_param(tensors, p, index, dtype)
        on_read()
        return out

    return orbax_stream.StreamedParam(p.shape, dtype, chunk, orbax_stream.owned_blocks(p.shape, sharding, chunk), read)


__all__ = ["import_checkpoint", "ImportReport", "load_torch", "read_param", "copy_into", "COPIED_FILES",
           # re-exported from import_plan / keys: the plan is part of this command's API
           "Source", "Param", "Plan", "open_source", "plan_import", "describe", "detect_layout", "is_torch_dir",
           "torch_shape", "PERMS", "ConversionError", "SafetensorsError"]
