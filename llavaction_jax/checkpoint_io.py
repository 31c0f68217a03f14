"""Our on-disk model format: `llavaction_config.json` + an Orbax checkpoint of the params tree in `params/`.

Restoring takes an abstract tree with target shardings, so each device (and each host of a pod) reads only
the slices it holds.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from llavaction_jax.config import ModelConfig

CONFIG_FILE = "llavaction_config.json"
PARAMS_DIR = "params"


def is_model_dir(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model(path: str | pathlib.Path, cfg: ModelConfig, params: dict) -> None:
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"{path / PARAMS_DIR} already exists; refusing to overwrite a saved model")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / PARAMS_DIR, params)
    ckpt.wait_until_finished()
    if jax.process_index() == 0:
        cfg.save(path / CONFIG_FILE)


def load_config(path: str | pathlib.Path) -> ModelConfig:
    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a llavaction_jax model directory")
    return ModelConfig.load(file)


def restore_params(path: str | pathlib.Path, abstract: dict) -> dict:
    """Restore into `abstract` (a tree of jax.ShapeDtypeStruct with shardings)."""
    return ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / PARAMS_DIR, abstract)
