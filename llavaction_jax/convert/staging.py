"""Conversions write into a staging folder beside the destination and rename it into place when complete.

An interrupted conversion (Ctrl-C, SIGKILL, a full disk) therefore never leaves a half-written destination.
The staging folder gets a marker file before anything else, so a leftover one is recognisably ours and the next
run replaces it; a destination that is not empty is refused, so nothing a user wrote is ever overwritten or
deleted.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from llavaction_jax import integrity

MARKER = ".llavaction-convert-incomplete"


def staging_dir(dst: pathlib.Path) -> pathlib.Path:
    return dst.parent / f".{dst.name}.converting"


def check(dst: pathlib.Path) -> None:
    """Refuse a destination that is not empty (a leftover of an interrupted run of ours does not count)."""
    if (dst / MARKER).is_file():
        return
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise FileExistsError(f"{dst} is not empty; refusing to write into it (pick a new or empty folder)")


def begin(dst: pathlib.Path, what: str) -> pathlib.Path:
    """Check `dst`, clear a leftover of an interrupted run, and create the marked staging folder."""
    stage = staging_dir(dst)
    if (dst / MARKER).is_file():  # renamed into place but killed before the marker went: ours, incomplete
        shutil.rmtree(dst)
    check(dst)
    if stage.exists():
        if not (stage / MARKER).is_file():
            raise FileExistsError(f"{stage} exists but is not an interrupted conversion of ours; move it away")
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    (stage / MARKER).write_text(json.dumps({"what": what, "destination": str(dst), "pid": os.getpid()}) + "\n")
    return stage


def commit(stage: pathlib.Path, dst: pathlib.Path, manifest: bool = True) -> None:
    """Checksum the finished staging folder (integrity.py: loaders verify it; `manifest=False` for a conversion of
    an unverified source, which gets none), move it to `dst` (an empty `dst` is replaced), then drop the marker."""
    if manifest:
        integrity.write_manifest(stage, exclude=(MARKER,))
    os.replace(stage, dst)  # rename(2): atomic, and replaces an empty directory
    (dst / MARKER).unlink()
