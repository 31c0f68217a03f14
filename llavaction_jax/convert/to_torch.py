"""Export: our model directory -> PyTorch safetensors + config.json, so fine-tuned models go back to PyTorch.

`layout="upstream"` writes the LLaVA-NeXT / LLaVAction state dict (the keys of upstream
`llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM`) and a config.json that upstream's
`llavaction/model/builder.py: load_pretrained_model` reads (model_type qwen2, LlavaQwenForCausalLM);
`layout="hf-onevision"` writes what `transformers.LlavaOnevisionForConditionalGeneration.from_pretrained` reads
(one_token models only), and the processor files `AutoProcessor.from_pretrained` reads (`hf_onevision.processor_files`;
an HF import's own are copied instead).

Streaming: every output file's header is written first (names, shapes and dtypes come from the config, through
the same key rules as the import, and the checkpoint's metadata); then each stored array is read through
tensorstore in blocks of whole stored chunks, at most `buffer_bytes / 2` each with the next one being read
meanwhile (`orbax_stream.read_blocks`), cut across layers and then across torch rows, and each block's rows are
written in place. Memory therefore does not grow with the model for checkpoints this converter wrote (a
checkpoint saved whole by a plain Orbax save has one chunk per array, read whole). Files above `max_shard_bytes`
are split into `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`. Dtypes are the stored
ones. The output is written into a staging folder beside `dst` and renamed into place (`staging.py`). The source is
verified against its checksums.json first; the export gets one only then (a model without one is exported with a
warning and no manifest).
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil

import numpy as np

from llavaction_jax import checkpoint_io, integrity
from llavaction_jax.config import ModelConfig
from llavaction_jax.convert import hf_onevision, orbax_stream, staging
from llavaction_jax.convert.from_torch import COPIED_FILES, progress_bar
from llavaction_jax.convert.import_plan import copy_into, detect_layout
from llavaction_jax.convert.keys import (ConversionError, expected_keys, to_torch, torch_row_axis, torch_shape,
                                         tower_of)
from llavaction_jax.convert.safetensors_io import (SafetensorsWriter, TensorSpec, plan_shards, shard_names,
                                                   write_index)
from llavaction_jax.convert.upstream_config import export_config
from llavaction_jax.data.tokenizer import has_tokenizer
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths

LAYOUTS = ("upstream", "hf-onevision")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def export_table(cfg: ModelConfig, stored: dict) -> list[tuple[str, str, int | None, str]]:
    """(upstream key, our path, layer, transform) for every tensor, with errors naming mismatched params."""
    specs = flatten_paths(llava.param_specs(cfg))
    problems = [f"missing parameter {p}" for p in specs if p not in stored]
    problems += [f"{p} is stored as {list(stored[p][0])}, the config expects {list(s.shape)}"
                 for p, s in specs.items() if p in stored and stored[p][0] != s.shape]
    problems += [f"unexpected parameter {p}" for p in stored if p not in specs]
    if problems:
        raise ConversionError("the checkpoint does not match its llavaction_config.json: " + "; ".join(problems))
    return expected_keys(specs, tower_of(cfg))


def export_checkpoint(src, dst, layout: str = "upstream", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True, buffer_bytes: int = orbax_stream.DEFAULT_BUFFER_BYTES) -> list[pathlib.Path]:
    """Write `dst` (new, or an empty folder) from the model directory `src`; returns the safetensors files."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    src, dst = pathlib.Path(src), pathlib.Path(dst).absolute()
    # A corrupt model is named before anything is written; an unverified one is exported without a manifest (not a
    # model directory at all: that one error, without the warning about its checksums)
    checkpoint_io.config_file(src)
    verified = integrity.verify_or_warn(src, f"so its export gets no {integrity.MANIFEST} either")
    cfg = checkpoint_io.load_config(src)
    stored = orbax_stream.StoredArrays(src / checkpoint_io.PARAMS_DIR)
    table = export_table(cfg, stored.params)
    rename, constants, processor, agreed = (lambda k: k), {}, {}, {}
    if layout == "hf-onevision":
        hf_onevision.check_exportable(cfg)
        rename = functools.partial(hf_onevision.hf_key, tower=tower_of(cfg))
        constants = hf_onevision.identity_tensors(cfg)
        if not (src / "preprocessor_config.json").is_file():  # else an HF import's own processor files are copied
            processor, agreed = hf_onevision.processor_files(cfg, src if has_tokenizer(src) else None)
    specs = []
    for key, path, layer, tf in table:
        shape = stored.params[path][0][1:] if layer is not None else stored.params[path][0]
        specs.append(TensorSpec(rename(key), torch_shape(shape, tf), stored.params[path][1]))
    dtype = stored.params[table[0][1]][1]
    specs += [TensorSpec(k, shape, dtype) for k, (shape, _) in constants.items()]

    stage = staging.begin(dst, f"convert to-torch {src}")
    shards = plan_shards(specs, max_shard_bytes)
    files = [stage / name for name in shard_names(len(shards))]
    writers = [SafetensorsWriter(f, shard) for f, shard in zip(files, shards)]
    writer_of = {s.key: w for w, shard in zip(writers, shards) for s in shard}
    by_path: dict[str, dict] = {}
    for key, path, layer, tf in table:
        by_path.setdefault(path, {})[layer] = (rename(key), tf)
    bar = progress_bar(sum(s.nbytes for s in specs), progress, "exporting")
    for path, keys in by_path.items():
        _write_param(stored.open(path), keys, writer_of, buffer_bytes, bar)
    for key, (shape, fill) in constants.items():
        writer_of[key].write(key, np.full(shape, fill, dtype))
    for w in writers:
        w.close()
    bar.close()
    if len(shards) > 1:
        write_index(stage, shards)

    original = _original_config(src)
    config = hf_onevision.hf_config(cfg) if layout == "hf-onevision" else export_config(cfg)
    if original is not None and _layout_of(original) == layout:
        _add_missing(config, original)  # keys we do not model travel back unchanged
    config.update(agreed)  # the token ids of the tokenizer written beside it
    dtype_key = next((k for k in ("torch_dtype", "dtype") if k in config), "torch_dtype")
    config[dtype_key] = np.dtype(dtype).name  # what the tensors are now (an import may have cast them)
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if name != "config.json" and name not in processor and (src / name).is_file():
            shutil.copyfile(src / name, stage / name)
    for name, text in processor.items():
        (stage / name).write_text(text, encoding="utf-8")
    staging.commit(stage, dst, manifest=verified)
    return [dst / f.name for f in files]


def _write_param(store, keys: dict, writer_of: dict, buffer_bytes: int, bar) -> None:
    """Write one stored array's tensors ({layer or None: (key, transform)}) block by block."""
    stacked = None not in keys
    transform = next(iter(keys.values()))[1]
    row = torch_row_axis(store.rank - stacked, transform) + stacked
    for index, block in orbax_stream.read_blocks(store, ([0] if stacked else []) + [row], buffer_bytes // 2):
        start = index[row].start
        for j, layer in enumerate(range(index[0].start, index[0].stop) if stacked else [None]):
            key, tf = keys[layer]
            view = to_torch(block[j] if stacked else block, tf)  # torch rows start:start + len(view)
            tensor = np.empty(view.shape, view.dtype)
            copy_into(tensor, view)  # tiled: a transposed copy element by element thrashes the cache
            writer_of[key].write(key, tensor, row=start)
            bar.update(tensor.nbytes)


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
