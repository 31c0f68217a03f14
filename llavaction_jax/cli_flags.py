"""One flag language for every command: the flags several commands share, defined and explained once.

| concept                | flag                                                                  |
| ---------------------- | --------------------------------------------------------------------- |
| where results go       | `--out PATH` (train: an alias of --config.train.output_dir)           |
| frames per clip        | `--num-frames N`                                                      |
| device mesh            | `--mesh data=-1,fsdp=1,tensor=1`                                      |
| multi-host             | `--distributed auto|on|off` (+ `--coordinator HOST:PORT               |
|                        | --num-processes N --process-id I` for processes started by hand)      |
| this process's slice   | `--process-id I` of `--num-processes N`                               |

`HelpFormatter` is every command's: a default is shown once, "(default: X)", unless the help already says it.

This module imports JAX only inside the functions that need it: extract-frames and build-mqa use it too, and
extract-frames' spawned decoder workers re-import their command module, where JAX would only cost start-up time.
"""

from __future__ import annotations

import argparse
import os
import re

MESH_AXES = ("data", "fsdp", "tensor")  # sharding.MESH_AXES, checked equal in tests/test_cli_flags.py
DISTRIBUTED_MODES = ("auto", "on", "off")  # distributed.MODES, likewise
DEFAULT_MESH = "data=-1,fsdp=1,tensor=1"


# Flags and train config fields that name files or folders. They must be local paths (a mounted bucket is one):
# outputs are staged and renamed into place, shards are ArrayRecord files read with local I/O, and Python's own
# file calls would turn "gs://b/x" into a local folder "gs:". docs/remote-storage.md says how to use buckets.
PATH_DESTS = ("out", "dst", "src", "model", "questions", "shards", "annotations", "tokenizer", "video_root", "jsonl",
              "ek100_csv", "vision_config", "predictions", "validation_csv", "train_csv", "video", "batch", "data",
              "pseudo_predictions", "clips_for", "avion", "tim", "config")
PATH_CONFIG_FIELDS = ("train.output_dir", "model.init_from", "data.samples", "data.shards", "data.tokenizer")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_PATH_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # what pathlib.Path makes of one: "gs://b" -> "gs:/b"


def refuse_urls(named_values) -> None:
    """Raise ValueError for the first (name, value) whose value is a URL (gs://, s3://, file://, ...)."""
    for name, value in named_values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) or isinstance(item, os.PathLike):
                text = os.fspath(item)
                if (_URL if isinstance(item, str) else _PATH_URL).match(text):
                    raise ValueError(
                        f"{name} {text}: URL paths are not supported; mount the bucket (e.g. gcsfuse, s3fs) and pass "
                        "the mounted path (docs/remote-storage.md)")


def refuse_url_args(args: argparse.Namespace) -> None:
    refuse_urls((f"--{dest.replace('_', '-')}", getattr(args, dest)) for dest in PATH_DESTS if hasattr(args, dest))


class CommandError(RuntimeError):
    """A command refused or failed for a reason its message explains; cli.main prints it in one line."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's --help: descriptions written with line breaks keep them (one-line ones are wrapped), and a
    flag's default is shown once, "(default: X)", unless its help already speaks of the default or it has none."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        return text + " (default: %(default)s)"


def add_out(parser, help: str, *, required: bool = True, **kwargs) -> None:
    parser.add_argument("--out", required=required, metavar="PATH", help=help, **kwargs)


def add_num_frames(parser, detail: str, default: int | None = None) -> None:
    """`--num-frames N`: frames per clip, with what the command does with them (`detail`) and its default."""
    parser.add_argument("--num-frames", type=int, default=default, metavar="N", help=f"frames per clip: {detail}")


def mesh_shape(text: str) -> dict[str, int]:
    """`--mesh` value -> make_mesh keyword arguments, e.g. "data=2,fsdp=-1,tensor=1"."""
    from llavaction_jax.sharding import parse_mesh  # imports JAX (see the module docstring)

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


MESH_HELP = ("device mesh over all devices of all processes, as axis=size (one size may be -1: the devices left; an "
             "axis left out takes make_mesh's default: data=1, fsdp=-1, tensor=1)")


def add_mesh(parser, default: str | None = DEFAULT_MESH, detail: str = "") -> None:
    """`--mesh data=D,fsdp=F,tensor=T`, the same words in every command (`detail`: what a missing one means)."""
    parser.add_argument("--mesh", type=mesh_shape, default=default, metavar="data=D,fsdp=F,tensor=T",
                        help=MESH_HELP + (f"; {detail}" if detail else f" (default: {default})"))


def add_distributed(parser, explicit: bool = True) -> None:
    """The multi-host switch. `explicit` adds the coordinator flags for processes started by hand."""
    parser.add_argument(
        "--distributed", choices=DISTRIBUTED_MODES, default="auto",
        help="multi-host: auto = jax.distributed.initialize() on a detected TPU pod slice, SLURM step or Open MPI "
             "job; on = always (JAX finds the cluster); off = never. Run the same command on every host (default: "
             "auto)")
    if explicit:
        parser.add_argument("--coordinator", metavar="HOST:PORT",
                            help="processes started by hand: the coordinator address (with --num-processes and "
                                 "--process-id); implies --distributed on")
        parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: number of processes")
        parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process's id")


def check_distributed(args: argparse.Namespace) -> None:
    """The coordinator flags' consistency, checked before any work."""
    if getattr(args, "coordinator", None) is None:
        return
    if args.distributed == "off":
        raise ValueError("--coordinator starts jax.distributed, which --distributed off forbids")
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")


def init_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed as `add_distributed`'s flags ask. Call before any JAX computation."""
    import jax  # see the module docstring

    from llavaction_jax import distributed
    check_distributed(args)
    if getattr(args, "coordinator", None) is None:
        distributed.maybe_initialize(args.distributed)
        return
    # CPU processes need a collectives backend for cross-process arrays; the setting does not touch GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def require_file(flag: str, path) -> None:
    """An input file that must exist, checked before any heavy work; the error names the flag and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: {'is a directory, not a file' if os.path.isdir(path) else 'no such file'}")


def require_dir(flag: str, path) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: {'is a file, not a directory' if os.path.exists(path) else 'no such directory'}")


def require_positive(args: argparse.Namespace, *dests: str) -> None:
    """Integer flags that, when given, must be at least 1."""
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} {value}: must be at least 1")
