"""One config language: `--config FILE --config.a.b=value`, parsed by `ml_collections.config_flags` (big_vision's
way), for every command that takes config overrides.

`train` takes a recipe file (configs/train.py: an ml_collections `get_config()`), and `eval`, `eval-suite`,
`predict` and `convert from-torch` take `--config.model.<field>=value` on top of their model. A recipe's `model`
section (`model_section()`) names its source (`preset`, or a converted checkpoint in `init_from`) and lists every
`ModelConfig` and `ExecutionConfig` field unset (None: the source's value), typed, so config_flags parses
`--config.model.<field>=value` (nested: `--config.model.text.num_layers=2`, execution: `--config.model.attention=flash`)
by the field's type. `load_recipe` then fills the section with every field of the source, the fields the recipe or the
command line set replacing the source's, so `--print-config` shows them all; `model_config` / `execution_config`
read the two back. A field cannot be set to None from the command line (None means "the source's value").
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from llavaction_jax import checkpoint_io
from llavaction_jax.config import (CONFIGS_DIR, ConfigError, ExecutionConfig, ModelConfig, config_fields,
                                   preset_configs, with_fields)

MODEL_SOURCE_KEYS = ("preset", "init_from")  # recipe keys of the model section that are not config fields


def model_section(preset: str = "tiny", init_from: str = "") -> ml_collections.ConfigDict:
    """A recipe's model section: its source and every model / execution field unset, with the field's type."""
    section = unset_fields(config_fields(ModelConfig(), ExecutionConfig()))
    section.preset, section.init_from = preset, init_from
    return section


def unset_fields(fields: dict) -> ml_collections.ConfigDict:
    """`fields` (a flat config dict) as a ConfigDict of typed None placeholders (nested dicts stay nested)."""
    def placeholder(value):
        if isinstance(value, dict):
            return unset_fields(value)
        kind = tuple if isinstance(value, (list, tuple)) else type(value)
        return ml_collections.FieldReference(None, field_type=kind)

    return ml_collections.ConfigDict({k: placeholder(v) for k, v in fields.items()})


def parse(overrides: list[str], config: ml_collections.ConfigDict | None = None,
          file: str | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """`config` (or the `get_config()` of `file`) with `--config.a.b=value` overrides, and the overridden values
    {"a.b": value}. Errors are one-line ConfigErrors naming the key."""
    argv = ["llavaction-jax", *([f"--config={file}"] if file else []), *overrides]
    with warnings.catch_warnings():
        # config_flags loads the recipe with SourceFileLoader.load_module, which Python 3.11 flags as deprecated
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        return _parse(argv, overrides, config, file)


def _parse(argv, overrides, config, file):
    values = flags.FlagValues()  # a fresh registry per call: commands and tests parse many times in one process
    try:
        if file:
            config_flags.DEFINE_config_file("config", file, flag_values=values, sys_argv=argv, lock_config=True)
        else:
            config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv, lock_config=True)
        rest = values(argv)
    except (KeyError, AttributeError) as error:  # config_dict's "no such field", raised while defining overrides
        raise ConfigError(_unknown_key(error, overrides)) from None
    except flags.Error as error:
        raise ConfigError(_one_line(error)) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument {rest[1]!r}; overrides look like --config.train.steps=10")
    return values.config, dict(values["config"].override_values)


def _one_line(error: BaseException) -> str:
    inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else error
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    text = text[len("flag "):] if text.startswith("flag --") else text  # absl: "flag --config.a=x: invalid ..."
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_key(error: BaseException, overrides: list[str]) -> str:
    """config_dict names the missing part ("'stesp'", then a did-you-mean line); say which override has it."""
    lines = _one_line(error).split("; ")
    part = lines[0].strip("'\"")
    keys = [o.split("=", 1)[0].lstrip("-") for o in overrides if o.startswith("--config.")]
    key = next((k for k in keys if part in k.split(".")), None)
    hint = f" ({lines[1][0].lower()}{lines[1][1:]})" if len(lines) > 1 else ""
    return f"--{key or 'config'}: no field {part!r}{hint}"


def recipe_file(path: str | pathlib.Path) -> pathlib.Path:
    """An existing file, or the name of a recipe in configs/ (a name resolves inside configs/ only)."""
    file = pathlib.Path(path)
    if file.is_file():
        return file
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
    if str(path) not in names:
        raise ConfigError(f"config file {path!r} not found (neither an existing file nor one of the names "
                          f"{', '.join(names)} in {CONFIGS_DIR})")
    return CONFIGS_DIR / f"{path}.py"


def load_recipe(path: str | pathlib.Path, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Load `path` (a recipe file or a name in configs/), apply `--config.a.b=value` overrides, and fill the model
    section with every field of its model config (module docstring)."""
    file = recipe_file(path)
    cfg, _ = parse(list(overrides or []), file=str(file))
    if "model" in cfg:
        section = filled_model_section(cfg.model, file)
        with cfg.unlocked():
            cfg.model = section
    return cfg


def set_fields(section: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """The fields a model section sets (not None), as dotted keys {"text.num_layers": 2}."""
    out = {}
    for key, value in section.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(set_fields(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def filled_model_section(section: ml_collections.ConfigDict, where) -> ml_collections.ConfigDict:
    cfg, execution = model_base(section)
    chosen = {k: v for k, v in set_fields(section).items() if k not in MODEL_SOURCE_KEYS}
    cfg, execution = with_fields(cfg, execution, chosen, f"{where}: model")
    filled = ml_collections.ConfigDict(config_fields(cfg, execution))
    for key in MODEL_SOURCE_KEYS:
        filled[key] = section.get(key) or ""
    return filled


def model_base(section) -> tuple[ModelConfig, ExecutionConfig]:
    """The configs a recipe's model section starts from: its `init_from` checkpoint's, else its preset's."""
    if section.get("init_from"):
        return checkpoint_io.load_config(section.init_from), checkpoint_io.load_execution(section.init_from)
    return preset_configs(section.get("preset") or "tiny")


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig a loaded recipe describes (its filled model section, plus the source's `extra` keys)."""
    fields = {k: v for k, v in cfg.model.to_dict().items() if k not in MODEL_SOURCE_KEYS}
    return ModelConfig.from_dict({**fields, "extra": model_base(cfg.model)[0].extra})


def execution_config(cfg: ml_collections.ConfigDict) -> ExecutionConfig:
    """The execution choices of a loaded recipe's model section."""
    return ExecutionConfig.from_dict(cfg.model.to_dict())


def model_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--config.model.<field>=value` overrides (eval, eval-suite, predict, convert from-torch) parsed by the
    fields' types, as dotted fields {"pool_mode": "average", "text.num_layers": 2}."""
    _, values = parse(list(overrides), ml_collections.ConfigDict({"model": model_section()}))
    return {key[len("model."):]: value for key, value in values.items()}


def configs_with_overrides(cfg: ModelConfig, execution: ExecutionConfig,
                           overrides: list[str]) -> tuple[ModelConfig, ExecutionConfig]:
    """`cfg` and `execution` with `--config.model.<field>=value` overrides (the same language as `train`)."""
    values = model_overrides(overrides)
    chosen = {k: v for k, v in values.items() if k not in MODEL_SOURCE_KEYS}
    if len(chosen) != len(values):
        raise ConfigError(f"--config.model.{'/'.join(MODEL_SOURCE_KEYS)} belong to train recipes; this command "
                          "takes its model from its own flags")
    return with_fields(cfg, execution, chosen, "--config.model")
