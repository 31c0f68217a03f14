"""Our on-disk model format: `llavaction_config.json` (the model config with, beside its fields, the execution
choices the model was saved with: config.py) + an Orbax checkpoint of the params tree in `params/`.

Restoring takes an abstract tree with target shardings, so each device (and each host of a pod) reads only
the slices it holds. `save_model` writes a `checksums.json` manifest last (llavaction_jax/integrity.py) and
`restore_params` verifies it, so flipped bits fail loading with a line naming the file (a directory without one
loads with a warning).
`publish_model` writes into `<path>.partial` and renames it into place, so an interrupted save never leaves a
half-written `<path>`.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llavaction_jax import integrity
from llavaction_jax.config import ExecutionConfig, ModelConfig
from llavaction_jax.pause_points import pause_point

CONFIG_FILE = "llavaction_config.json"
PARAMS_DIR = "params"


def is_model_dir(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model(path: str | pathlib.Path, cfg: ModelConfig, params: dict, extra_files: dict[str, str] | None = None,
               execution: ExecutionConfig | None = None) -> None:
    """Write a model directory; `extra_files` (name -> text) are written beside the config, before the checksums.
    `execution`: the choices the model is run with when loaded (default: all "auto")."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"{path / PARAMS_DIR} already exists; refusing to overwrite a saved model")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / PARAMS_DIR, params)
    ckpt.wait_until_finished()
    pause_point("model-params-written")
    if jax.process_index() == 0:
        cfg.save(path / CONFIG_FILE, execution or ExecutionConfig())
        for name, text in (extra_files or {}).items():
            (path / name).write_text(text)
        integrity.write_manifest(path)


def sync_processes(name: str) -> None:
    """A barrier across processes (no-op in one process), e.g. after process 0 renamed files the others read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def publish_model(path: str | pathlib.Path, cfg: ModelConfig, params: dict, extra_files: dict[str, str] | None = None,
                  execution: ExecutionConfig | None = None) -> None:
    """`save_model` into `<path>.partial`, then swap it in: an existing `path` is moved to `<path>.previous` and
    removed only once the new directory is complete and in place. A `.partial` left by an interrupted save (ours:
    nothing else writes that name) is removed first."""
    path = pathlib.Path(path).absolute()
    partial, aside = (path.with_name(path.name + suffix) for suffix in (".partial", ".previous"))
    if jax.process_index() == 0 and partial.exists():
        shutil.rmtree(partial)
    sync_processes("publish_model: partial cleared")
    save_model(partial, cfg, params, extra_files, execution)
    if jax.process_index() == 0:
        integrity.verify_manifest(partial)
        if path.exists():
            if aside.exists():  # an older model from an interrupted swap, superseded by the complete new one
                shutil.rmtree(aside)
            path.rename(aside)
        partial.rename(path)
        if aside.exists():
            shutil.rmtree(aside)
    sync_processes("publish_model: done")


def load_config(path: str | pathlib.Path) -> ModelConfig:
    return ModelConfig.load(config_file(path))


def load_execution(path: str | pathlib.Path) -> ExecutionConfig:
    """The execution choices a model directory was saved with (defaults where it names none)."""
    return ExecutionConfig.load(config_file(path))


def config_file(path: str | pathlib.Path) -> pathlib.Path:
    """The model directory's config file; FileNotFoundError naming it where there is none."""
    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a llavaction_jax model directory")
    return file


def restore_params(path: str | pathlib.Path, abstract: dict) -> dict:
    """Restore into `abstract` (a tree of jax.ShapeDtypeStruct with shardings), after checking the files against
    the directory's checksums.json (integrity.IntegrityError when they differ; a directory without one is loaded
    with one warning, integrity.verify_or_warn)."""
    integrity.verify_or_warn(path, "an older or hand-made model directory")
    return ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / PARAMS_DIR, abstract)


def stored_param_shapes(path: str | pathlib.Path) -> dict[str, tuple[int, ...]]:
    """{"text/layers/0/...": shape} of the params a model directory stores (from Orbax's metadata, no array read)."""
    meta = ocp.StandardCheckpointer().metadata(pathlib.Path(path).absolute() / PARAMS_DIR).item_metadata
    leaves = jax.tree_util.tree_leaves_with_path(getattr(meta, "tree", meta), is_leaf=lambda x: hasattr(x, "shape"))
    return {param_path(p): tuple(leaf.shape) for p, leaf in leaves}


def param_path(path) -> str:
    """A pytree key path as "heads/verb/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

