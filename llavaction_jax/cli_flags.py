"""One flag language for every command: the flags several commands share, defined once.

| concept                | flag                                           | old spellings (hidden, warn once)        |
| ---------------------- | ---------------------------------------------- | ---------------------------------------- |
| where results go       | `--out PATH` (train: = config.train.output_dir) | `--output` (build-mqa), positional DST  |
|                        |                                                | (convert)                                |
| frames per clip        | `--num-frames N`                               | `--n-frames` (build-mqa), `--frames`     |
|                        |                                                | (demo, benchmarks)                       |
| device mesh            | `--mesh data=-1,fsdp=1,tensor=1`               | `--mesh 1,-1,1` (convert)                |
| multi-host             | `--distributed auto|on|off` (+ `--coordinator  | `--coordinator auto` (eval), bare        |
|                        | HOST:PORT --num-processes N --process-id I`)   | `--distributed` (convert) = on           |
| this process's slice   | `--process-id I` of `--num-processes N`        | `--process-index` (build-mqa)            |

Old spellings keep working so existing scripts and other branches do not break; they are hidden from `--help`
and print one `warning:` line on stderr naming the new flag.

This module imports JAX only inside the functions that need it: extract-frames and build-mqa use it too, and
extract-frames' spawned decoder workers re-import their command module, where JAX would only cost start-up time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

MESH_AXES = ("data", "fsdp", "tensor")  # sharding.MESH_AXES, checked equal in tests/test_cli_flags.py
DISTRIBUTED_MODES = ("auto", "on", "off")  # distributed.MODES, likewise
DEFAULT_MESH = "data=-1,fsdp=1,tensor=1"


# Flags and train config fields that name files or folders. They must be local paths (a mounted bucket is one):
# outputs are staged and renamed into place, shards are ArrayRecord files read with local I/O, and Python's own
# file calls would turn "gs://b/x" into a local folder "gs:". docs/remote-storage.md says how to use buckets.
PATH_DESTS = ("out", "dst", "src", "model", "questions", "shards", "annotations", "tokenizer", "video_root", "jsonl",
              "ek100_csv", "vision_config", "predictions", "validation_csv", "train_csv")
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


def warn_deprecated(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's dest and prints one deprecation line."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.new)
        setattr(namespace, self.dest, values)


def add_flag(parser, flag: str, *, old: tuple[str, ...] = (), required: bool = False, **kwargs) -> None:
    """`parser.add_argument(flag, **kwargs)` plus hidden deprecated `old` spellings writing the same dest. A
    required flag and its old spellings form a required group, so either spelling satisfies it."""
    dest = flag.lstrip("-").replace("-", "_")
    target = parser.add_mutually_exclusive_group(required=True) if required and old else parser
    if required and not old:
        kwargs["required"] = True
    target.add_argument(flag, dest=dest, **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k in ("type", "metavar")}
    for name in old:
        target.add_argument(name, dest=dest, action=DeprecatedAlias, new=flag, **alias_kwargs)


def add_out(parser, help: str, *, old: tuple[str, ...] = (), required: bool = True, **kwargs) -> None:
    add_flag(parser, "--out", old=old, required=required, help=help, metavar="PATH", **kwargs)


def add_num_frames(parser, help: str, *, old: tuple[str, ...] = (), **kwargs) -> None:
    add_flag(parser, "--num-frames", old=old, type=int, metavar="N", help=help, **kwargs)


def mesh_shape(text: str) -> dict[str, int]:
    """`--mesh` value -> make_mesh keyword arguments. "data=2,fsdp=-1,tensor=1"; the old positional form
    "2,-1,1" (DATA,FSDP,TENSOR) still works with a warning."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if items and all("=" not in s for s in items):
        try:
            values = [int(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"mesh {text!r}: write it as {DEFAULT_MESH}") from None
        if len(values) != len(MESH_AXES):
            raise argparse.ArgumentTypeError(f"mesh {text!r}: write it as {DEFAULT_MESH}")
        new = ",".join(f"{a}={v}" for a, v in zip(MESH_AXES, values))
        warn_deprecated(f"--mesh {text}", f"--mesh {new}")
        return dict(zip(MESH_AXES, values))
    from llavaction_jax.sharding import parse_mesh  # imports JAX (see the module docstring)

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_mesh(parser, help: str = "device mesh over all devices of all processes; one axis may be -1 (the rest)",
             default: str | None = DEFAULT_MESH) -> None:
    parser.add_argument("--mesh", type=mesh_shape, default=default, metavar="data=D,fsdp=F,tensor=T", help=help)


def add_distributed(parser, explicit: bool = True) -> None:
    """The multi-host switch. `explicit` adds the coordinator flags for processes started by hand."""
    parser.add_argument(
        "--distributed", choices=DISTRIBUTED_MODES, nargs="?", const="on", default="auto",
        help="multi-host: auto = jax.distributed.initialize() on a detected TPU pod slice, SLURM step or Open MPI "
             "job; on = always (JAX finds the cluster); off = never. Run the same command on every host")
    if explicit:
        parser.add_argument("--coordinator", metavar="HOST:PORT",
                            help="processes started by hand: the coordinator address (with --num-processes and "
                                 "--process-id); implies --distributed on")
        parser.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: number of processes")
        parser.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this process's id")


def init_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed as `add_distributed`'s flags ask. Call before any JAX computation."""
    import jax  # see the module docstring

    from llavaction_jax import distributed  # imports JAX too (the module docstring)
    coordinator = getattr(args, "coordinator", None)
    if coordinator == "auto":  # the old eval spelling of "let JAX find the cluster"
        warn_deprecated("--coordinator auto", "--distributed on")
        coordinator, args.distributed = None, "on"
    if coordinator is None:
        distributed.maybe_initialize(args.distributed)
        return
    if args.distributed == "off":
        raise ValueError("--coordinator starts jax.distributed, which --distributed off forbids")
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    # CPU processes need a collectives backend for cross-process arrays; the setting does not touch GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
