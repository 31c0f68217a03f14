"""Recipe configs (configs/train.py, ...): ml_collections `get_config()` files plus `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import pathlib

import ml_collections

from llavaction_jax.config import CONFIGS_DIR, ConfigError, run_config_file


def load_recipe(path: str | pathlib.Path, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `path` (an existing file, or the name of a recipe in configs/) and apply command-line overrides."""
    file = pathlib.Path(path)
    if not file.is_file():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        if str(path) not in names:  # a name resolves inside configs/ only, never to a path outside it
            raise ConfigError(f"config file {path!r} not found (neither an existing file nor one of the names "
                              f"{', '.join(names)} in {CONFIGS_DIR})")
        file = CONFIGS_DIR / f"{path}.py"
    cfg = run_config_file(file)
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """`--config.train.steps=10` or `--config.train.steps 10`; values are parsed by the type of the default."""
    pairs, i = [], 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--config."):
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --config.train.steps=10")
        key = item[len("--config."):]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(overrides):
            i, value = i + 1, overrides[i + 1]
        else:
            raise ConfigError(f"override {item!r} has no value")
        pairs.append((key, value))
        i += 1
    for key, value in pairs:
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            if p not in node:
                raise ConfigError(f"override --config.{key}: no field {p!r}")
            node = node[p]
        if last not in node:
            raise ConfigError(f"override --config.{key}: no such field; available: {sorted(node.keys())}")
        node[last] = parse_value(value, node[last], key)


def parse_value(text: str, default, key: str):
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key} expects true or false, got {text!r}")
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise ConfigError(f"--config.{key}: cannot parse {text!r} as {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if default is not None and not isinstance(value, type(default)) and not isinstance(default, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} expects {type(default).__name__}, got {text!r}")
    return value
