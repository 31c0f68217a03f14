"""`python -m llavaction_jax train`: run or resume training from a recipe config with overrides."""

from __future__ import annotations

import argparse
import sys

from llavaction_jax.config import ConfigError
from llavaction_jax.data.mixture import MixtureError
from llavaction_jax.integrity import IntegrityError
from llavaction_jax.recipes import load_recipe, model_config
from llavaction_jax.train.checkpoint import CheckpointError
from llavaction_jax.train.guard import validate
from llavaction_jax.train.loop import NonFiniteLoss, train

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train or fine-tune LLaVAction on a (data, fsdp, tensor) mesh. Re-running the same command resumes from "
        "the newest good checkpoint in <output_dir>/checkpoints. SIGTERM writes a checkpoint and exits 0. "
        "Any config field can be overridden: --config.train.steps=1000 --config.mesh.fsdp=8 ...")
    parser.add_argument("--config", default="train", help="recipe file or name in configs/ (default: train)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


EXIT_REFUSED = 2  # bad recipe values or inputs, or a rerun that does not match the run in output_dir


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_recipe(args.config, args.config_overrides)
        model_config(cfg)  # validates every model field before anything runs
        validate(cfg)
    except ConfigError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if args.print_config:
        print(cfg)
        return 0
    if not cfg.data.samples:
        print("train: error: set --config.data.samples (a data YAML or a JSON/JSONL of samples) and, for video "
              "samples, --config.data.shards", file=sys.stderr)
        return EXIT_REFUSED
    try:
        train(cfg)
    except NonFiniteLoss as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, MixtureError, CheckpointError, IntegrityError) as e:  # one line, no traceback
        print(f"train: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
