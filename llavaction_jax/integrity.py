"""Checksums of stored artifacts: a `checksums.json` manifest of per-file sha256 next to the files it covers.

Writers call `write_manifest(directory)` once everything else in the directory is complete (the manifest is
written last, atomically, so its presence also marks the directory as finished); readers call
`verify_manifest(directory)` before loading, which raises `IntegrityError` naming the first file that is missing
or differs. Used for training checkpoints (train/checkpoint.py) and model directories (checkpoint_io.py); the
converter and exports can call the same two functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

MANIFEST = "checksums.json"
SCHEMA = "llavaction_jax.checksums/1"


class IntegrityError(RuntimeError):
    """A stored file is missing, or its bytes differ from the checksum written when it was saved."""


def file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: pathlib.Path, exclude: tuple[str, ...] = ()) -> list[pathlib.Path]:
    skip = {MANIFEST, *exclude}
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in skip)


def write_manifest(directory: str | os.PathLike, exclude: tuple[str, ...] = ()) -> pathlib.Path:
    """Checksum every file under `directory` (recursively; but the relative paths in `exclude`) into
    `directory/checksums.json`; returns its path."""
    directory = pathlib.Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in _files(directory, exclude)}
    target = directory / MANIFEST
    tmp = target.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "files": files}, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def has_manifest(directory: str | os.PathLike) -> bool:
    return (pathlib.Path(directory) / MANIFEST).is_file()


def verify_manifest(directory: str | os.PathLike, required: bool = True) -> bool:
    """Check every file the manifest lists (size, then sha256). Returns False when there is no manifest and
    `required` is false; raises IntegrityError (one line, naming the file) on any difference."""
    directory = pathlib.Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if required:
            raise IntegrityError(f"{manifest} is missing: the save did not finish, or the files were not checksummed")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{manifest} is unreadable ({type(e).__name__})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (listed in {manifest})")
        if path.stat().st_size != expected["bytes"]:
            raise IntegrityError(f"{path} has {path.stat().st_size} bytes, {expected['bytes']} were written")
        if file_sha256(path) != expected["sha256"]:
            raise IntegrityError(f"{path} is corrupt: its sha256 differs from the one written when it was saved")
    return True
