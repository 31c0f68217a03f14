"""Recipe configs (configs/train.py, ...): ml_collections `get_config()` files plus `--config.a.b=value` overrides.

The model section is one language for every command: a recipe's `model` names its source (`preset`, or a
converted checkpoint in `init_from`), and `load_recipe` fills the section with *every* `ModelConfig` and
`ExecutionConfig` field of that source (config.py: one flat dict), so `--config.model.<field>=value` (nested:
`--config.model.text.num_layers=2`, execution: `--config.model.attention=flash`) sets any of them and
`--print-config` shows them all. `model_config` / `execution_config` read the two back. `eval` and `convert` take
the same `--config.model.<field>=` overrides on top of their model (`configs_with_overrides`). Fields set in a
recipe file's `model` section apply before the command line's.
"""

from __future__ import annotations

import ast
import pathlib

import ml_collections

from llavaction_jax import checkpoint_io
from llavaction_jax.config import (CONFIGS_DIR, ConfigError, ExecutionConfig, ModelConfig, config_fields,
                                   preset_configs, run_config_file)

MODEL_SOURCE_KEYS = ("preset", "init_from")  # recipe keys of the model section that are not config fields


def load_recipe(path: str | pathlib.Path, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `path` (an existing file, or the name of a recipe in configs/), apply command-line overrides, and fill
    the model section with every field of its model config (see the module docstring)."""
    file = pathlib.Path(path)
    if not file.is_file():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        if str(path) not in names:  # a name resolves inside configs/ only, never to a path outside it
            raise ConfigError(f"config file {path!r} not found (neither an existing file nor one of the names "
                              f"{', '.join(names)} in {CONFIGS_DIR})")
        file = CONFIGS_DIR / f"{path}.py"
    cfg = run_config_file(file)
    pairs = parse_overrides(overrides or [])
    is_field = lambda key: key.startswith("model.") and key.split(".")[1] not in MODEL_SOURCE_KEYS
    set_values(cfg, [(k, v) for k, v in pairs if not is_field(k)])
    if "model" in cfg:
        recipe_fields = {k: v for k, v in cfg.model.items() if k not in MODEL_SOURCE_KEYS}
        section = model_section(*model_base(cfg.model))
        for key, value in recipe_fields.items():
            if key not in section:
                raise ConfigError(f"{file}: model.{key} is not a model config field; available: {sorted(section)}")
            if isinstance(value, ml_collections.ConfigDict):
                section[key].update(value)
            else:
                section[key] = value
        for key in MODEL_SOURCE_KEYS:
            section[key] = cfg.model.get(key, "")
        cfg.model = section
    set_values(cfg, [(k, v) for k, v in pairs if is_field(k)])
    return cfg


def model_base(section) -> tuple[ModelConfig, ExecutionConfig]:
    """The configs a recipe's model section starts from: its `init_from` checkpoint's, else its preset's."""
    if section.get("init_from"):
        return checkpoint_io.load_config(section.init_from), checkpoint_io.load_execution(section.init_from)
    return preset_configs(section.get("preset") or "tiny")


def model_section(cfg: ModelConfig, execution: ExecutionConfig) -> ml_collections.ConfigDict:
    """Every field of `cfg` (but the upstream keys carried in `extra`) and of `execution` as a ConfigDict."""
    return ml_collections.ConfigDict(config_fields(cfg, execution))


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig a loaded recipe describes (its filled model section, plus the source's `extra` keys)."""
    fields = {k: v for k, v in cfg.model.to_dict().items() if k not in MODEL_SOURCE_KEYS}
    return ModelConfig.from_dict({**fields, "extra": model_base(cfg.model)[0].extra})


def execution_config(cfg: ml_collections.ConfigDict) -> ExecutionConfig:
    """The execution choices of a loaded recipe's model section."""
    return ExecutionConfig.from_dict(cfg.model.to_dict())


def configs_with_overrides(cfg: ModelConfig, execution: ExecutionConfig,
                           overrides: list[str]) -> tuple[ModelConfig, ExecutionConfig]:
    """`cfg` and `execution` with `--config.model.<field>=value` overrides (the same syntax as `train`), for eval
    and convert."""
    holder = ml_collections.ConfigDict({"model": model_section(cfg, execution)})
    set_values(holder, parse_overrides(overrides))
    fields = holder.model.to_dict()
    return ModelConfig.from_dict({**fields, "extra": cfg.extra}), ExecutionConfig.from_dict(fields)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """`--config.train.steps=10` or `--config.train.steps 10` -> [("train.steps", "10")]."""
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
    return pairs


def set_values(cfg: ml_collections.ConfigDict, pairs: list[tuple[str, str]]) -> None:
    """Set dotted keys; values are parsed by the type of the default."""
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
