"""`python -m llavaction_jax train`: run or resume training from a recipe config with overrides."""

from __future__ import annotations

import argparse

from llavaction_jax import cli_flags
from llavaction_jax.config import ConfigError
from llavaction_jax.recipes import execution_config, load_recipe, model_config
from llavaction_jax.train.guard import validate
from llavaction_jax.train.loop import train
from llavaction_jax.train.metrics import check_wandb

ACCEPTS_CONFIG_OVERRIDES = True
OUT_FIELD = "train.output_dir"  # --out is an alias of this field


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train or fine-tune LLaVAction on a (data, fsdp, tensor) mesh. Re-running the same command resumes from "
        "the newest good checkpoint in <output_dir>/checkpoints. SIGTERM writes a checkpoint and exits 0. "
        "Any config field can be overridden (ml_collections config_flags): --config.train.steps=1000 "
        "--config.mesh.fsdp=8 --config.data.num_frames=64 --config.distributed=on --config.model.attention=flash ...")
    parser.add_argument("--config", default="train", metavar="FILE",
                        help="recipe file (an ml_collections get_config()), or a recipe name in configs/ (default: "
                             "train)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cli_flags.add_out(parser, f"run directory: checkpoints, final model, metrics (an alias of --config.{OUT_FIELD})",
                      required=False)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's config overrides, --out first as the field it stands for; giving both is refused."""
    if args.out is None:
        return list(args.config_overrides)
    if any(o.split("=", 1)[0] == f"--config.{OUT_FIELD}" for o in args.config_overrides):
        raise ConfigError(f"--config.{OUT_FIELD} is also set by --out; give it once")
    return [f"--config.{OUT_FIELD}={args.out}", *args.config_overrides]


def run(args: argparse.Namespace) -> int:
    """Errors (bad recipe values or inputs, a rerun that does not match the run in output_dir, a NaN loss) are
    reported by cli.main: one line, exit status 2."""
    overrides = overrides_of(args)
    # URLs in path fields are refused before the recipe loads (loading reads model.init_from's config)
    cli_flags.refuse_urls(tuple(o.split("=", 1)) for o in overrides
                          if "=" in o and o.split("=", 1)[0][len("--config."):] in cli_flags.PATH_CONFIG_FIELDS)
    cfg = load_recipe(args.config, overrides)
    cli_flags.refuse_urls((f"config.{f}", cfg[f.split(".")[0]][f.split(".")[1]]) for f in cli_flags.PATH_CONFIG_FIELDS)
    model_config(cfg), execution_config(cfg)  # validate every model field before anything runs
    validate(cfg)
    check_wandb(cfg.train.wandb_project)
    if args.print_config:
        print(cfg)
        return 0
    if not cfg.data.samples:
        raise ConfigError("set --config.data.samples (a data YAML or a JSON/JSONL of samples) and, for video "
                          "samples, --config.data.shards")
    train(cfg)
    return 0
