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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train or fine-tune LLaVAction on a (data, fsdp, tensor) mesh. Re-running the same command resumes from "
        "the newest good checkpoint in <output_dir>/checkpoints. SIGTERM writes a checkpoint and exits 0. "
        "Any config field can be overridden: --config.train.steps=1000 --config.mesh.fsdp=8 ...")
    parser.add_argument("--config", default="train", help="recipe file or name in configs/ (default: train)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The flags every command shares, as shorthands for their config fields.
    cli_flags.add_out(parser, "run directory: checkpoints, final model, metrics (= --config.train.output_dir)",
                      required=False)
    cli_flags.add_num_frames(parser, "frames per clip (= --config.data.num_frames; default: the shards')", default=None)
    cli_flags.add_mesh(parser, default=None, help="device mesh, e.g. data=1,fsdp=-1,tensor=1 (= --config.mesh.*)")
    cli_flags.add_distributed(parser, explicit=False)
    parser.set_defaults(distributed=None)  # unset: the recipe's config.distributed decides


def shared_flag_overrides(args: argparse.Namespace) -> list[str]:
    """--out / --num-frames / --mesh / --distributed as --config overrides; giving a field both ways is refused."""
    fields = {}
    if args.out is not None:
        fields["train.output_dir"] = args.out
    if args.num_frames is not None:
        fields["data.num_frames"] = args.num_frames
    for axis, size in (args.mesh or {}).items():
        fields[f"mesh.{axis}"] = size
    if args.distributed is not None:
        fields["distributed"] = args.distributed
    twice = [f for f in fields if any(o.startswith(f"--config.{f}=") for o in args.config_overrides)]
    if twice:
        raise ConfigError(f"--config.{twice[0]} is also set by --out / --num-frames / --mesh / --distributed; give it "
                          "once")
    return [f"--config.{field}={value}" for field, value in fields.items()]


def run(args: argparse.Namespace) -> int:
    """Errors (bad recipe values or inputs, a rerun that does not match the run in output_dir, a NaN loss) are
    reported by cli.main: one line, exit status 2."""
    overrides = shared_flag_overrides(args) + args.config_overrides
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
