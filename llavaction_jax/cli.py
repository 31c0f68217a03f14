"""One entry point: ``python -m llavaction_jax <command> --help``.

Each command lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules
are imported only when their command runs, so ``--help`` stays fast and a command's heavy imports (torch,
decord, ...) never slow down another. Flags shared by several commands are defined once in cli_flags.py. A module
with ``ACCEPTS_CONFIG_OVERRIDES = True`` receives the ``--config.a.b=value`` arguments in ``args.config_overrides``
(parsed by ml_collections.config_flags, recipes.py); any other unknown flag is named as unrecognized before
anything else is checked.

Errors are handled here, once, for every command: bad arguments or inputs (ValueError, KeyError, OSError, and
every exception class defined in this package) print one line, ``<command>: error: <message>``, and exit with
status 2, the status argparse uses for a bad command line. ``LLAVACTION_TRACEBACK=1`` shows the traceback instead.
Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from absl import flags

from llavaction_jax import __version__, cli_flags, host

# command -> (module, one-line help)
EXIT_ERROR = 2  # any handled error, in every command (argparse's own usage errors exit 2 too)

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("llavaction_jax.demo", "run the end-to-end demo on an embedded synthetic default"),
    "extract-frames": ("llavaction_jax.data.extract", "decode videos once into ArrayRecord frame shards"),
    "build-mqa": ("llavaction_jax.ek100.build_mqa", "build an EK100-MQA question file from annotation CSVs"),
    "build-train": ("llavaction_jax.ek100.build_train", "write EK100 training files in upstream's layout + a data YAML"),
    "train": ("llavaction_jax.train.cli", "train or fine-tune on a mesh (resumable; config file + --config.x=y overrides)"),
    "eval": ("llavaction_jax.eval.mqa_eval", "evaluate a model on an EK100-MQA (or generic video QA) question file"),
    "predict": ("llavaction_jax.eval.predict", "answer a question about a video file (or many: --batch FILE.jsonl)"),
    "convert": ("llavaction_jax.convert.cli", "convert checkpoints between PyTorch (upstream / HF) and our Orbax format"),
    "build-bench": ("llavaction_jax.eval.benchmarks.build", "question files from a video benchmark's official annotations"),
    "eval-suite": ("llavaction_jax.eval.benchmarks.suite", "evaluate a suite of benchmarks (--suite paper) into one table"),
}


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host.prefer_cpu_without_accelerators()
    parser = OneLineErrorParser(
        prog=_prog(),
        description="LLaVAction in JAX: convert checkpoints, evaluate on EK100-MQA, train on a mesh.",
    )
    parser.add_argument("--version", action="version", version=f"llavaction-jax {__version__}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {name: spec for name, spec in COMMANDS.items() if _module_exists(spec[0])}
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in available.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command pays for importing its module
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.accepts_config_overrides = getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False)
            p.set_defaults(_run=module.run)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if any(not e.startswith("--config.") for e in extra[:1]):  # a stray positional argument
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    _parse_absl_flags()
    try:
        cli_flags.refuse_url_args(args)
        cli_flags.check_distributed(args)
        return int(args._run(args) or 0)
    except Exception as error:
        if not is_user_error(error) or os.environ.get("LLAVACTION_TRACEBACK") == "1":
            raise
        print(f"{args.command}: error: {error_message(error)}", file=sys.stderr)
        return EXIT_ERROR


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage first), with the same exit status 2. The
    commands' sub-parsers are of this class as well (argparse makes sub-parsers of the parent's class).

    A mistyped flag is named as such: argparse checks required flags before it reports unknown ones (`predict
    --vidoe x` would say "one of the arguments --video --batch is required"), so the flags are looked up first
    (hand-written: argparse has no public hook between reading the flags and its required-flag check)."""

    def __init__(self, *args, accepts_config_overrides: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", cli_flags.HelpFormatter)
        super().__init__(*args, **kwargs)
        self.accepts_config_overrides = accepts_config_overrides

    def parse_known_args(self, args=None, namespace=None):
        unknown = self.unknown_options(sys.argv[1:] if args is None else list(args))
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)

    def unknown_options(self, args: list[str]) -> list[str]:
        """The flags in `args` this parser does not define (up to its sub-command's name, or `--`)."""
        commands = [a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        known = [o for o in self._option_string_actions if o.startswith("--")]
        unknown = []
        for token in args:
            if token == "--" or any(token in c for c in commands):
                break
            name = token.split("=", 1)[0]
            if (not token.startswith("-") or token == "-" or self._negative_number_matcher.match(token)
                    or name in self._option_string_actions or name[:2] in self._option_string_actions
                    or (self.accepts_config_overrides and name.startswith("--config."))
                    or (self.allow_abbrev and name.startswith("--") and any(o.startswith(name) for o in known))):
                continue
            unknown.append(name)
        return unknown

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _prog() -> str:
    # the console script installed by `pip install .`, or the module
    return "llavaction-jax" if os.path.basename(sys.argv[0]) == "llavaction-jax" else "python -m llavaction_jax"


def is_user_error(error: BaseException) -> bool:
    """Bad input or refused work (reported in one line), as opposed to a bug (reported with its traceback)."""
    return (isinstance(error, (ValueError, KeyError, OSError))
            or type(error).__module__.split(".")[0] == "llavaction_jax")


def error_message(error: BaseException) -> str:
    """The error's own text on one line (KeyError's str() would quote it; the lines of a multi-line message are
    joined with "; ")."""
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def _parse_absl_flags() -> None:
    # Grain's worker processes read absl flags; parse them once so workers can start (Grain raises
    # UnparsedFlagAccessError otherwise).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


if __name__ == "__main__":
    raise SystemExit(main())
