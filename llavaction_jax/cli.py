"""One entry point: ``python -m llavaction_jax <command> --help``.

Each command lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules
are imported only when their command runs, so ``--help`` stays fast and a command's heavy imports (torch,
decord, ...) never slow down another.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from absl import flags

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("llavaction_jax.demo", "run the end-to-end demo on an embedded synthetic default"),
    "extract-frames": ("llavaction_jax.data.extract", "decode videos once into ArrayRecord frame shards"),
    "build-mqa": ("llavaction_jax.data.mqa", "build an EK100-MQA question file from annotation CSVs"),
    "train": ("llavaction_jax.train.cli", "train or fine-tune on a mesh (resumable; config file + --config.x=y overrides)"),
    "eval": ("llavaction_jax.eval.mqa_eval", "evaluate a model on an EK100-MQA (or generic video QA) question file"),
    "predict": ("llavaction_jax.eval.predict", "answer a question about a video file (or many: --batch FILE.jsonl)"),
    "convert": ("llavaction_jax.convert.cli", "convert checkpoints between PyTorch (upstream / HF) and our Orbax format"),
}


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m llavaction_jax",
        description="LLaVAction in JAX: convert checkpoints, evaluate on EK100-MQA, train on a mesh.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {name: spec for name, spec in COMMANDS.items() if _module_exists(spec[0])}
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in available.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command pays for importing its module
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run, _overrides=getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False))
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not (args._overrides and all(e.startswith("--config.") or not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    _parse_absl_flags()
    return int(args._run(args) or 0)


def _parse_absl_flags() -> None:
    # Grain's worker processes read absl flags; parse them once so workers can start (Grain raises
    # UnparsedFlagAccessError otherwise).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


if __name__ == "__main__":
    raise SystemExit(main())
