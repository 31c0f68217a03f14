"""Checksums of stored artifacts: a `checksums.json` manifest of per-file sha256 next to the files it covers.

Writers call `write_manifest(directory)` once everything else in the directory is complete (the manifest is
written last, atomically, so its presence also marks the directory as finished); readers call
`verify_manifest(directory)` before loading, which raises `IntegrityError` naming the first file that is missing
or differs. Used for training checkpoints (train/checkpoint.py), model directories (checkpoint_io.py) and the
converter's inputs and outputs (convert/).

The rules every reader follows (`verify_or_warn`): a directory with a manifest is verified, always; one without
is used with one warning per directory and process; and data that failed or skipped verification never gets a
new manifest (an export of an unverified model is written without one), so a manifest always vouches for bytes
that descend from verified ones. `content_digest` names a directory's content (its manifest, else its files'
digests), for resume fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys

MANIFEST = "checksums.json"
SCHEMA = "llavaction_jax.checksums/1"
log = logging.getLogger(__name__)
_warned: set[str] = set()


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
    try:
        tmp.write_text(json.dumps({"schema": SCHEMA, "files": files}, indent=0, sort_keys=True) + "\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no torn manifest is left to be mistaken for a seal
        raise
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


def verify_or_warn(directory: str | os.PathLike, what: str = "") -> bool:
    """Verify `directory` against its manifest (IntegrityError on any difference) and return True; without a
    manifest, warn once per directory in this process and return False (the data is unverified)."""
    if verify_manifest(directory, required=False):
        return True
    key = str(pathlib.Path(directory).absolute())
    if key not in _warned:
        _warned.add(key)
        message = (f"{directory} has no {MANIFEST}, so its files cannot be verified{f' ({what})' if what else ''}; "
                   "using them as they are")
        log.warning(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
    return False


def content_digest(directory: str | os.PathLike, subpaths: tuple[str, ...] = ()) -> str:
    """A sha256 naming the content of `directory`: of its manifest's file list when it has one (loaders verify the
    files against it), else of every file's sha256 (under `subpaths` only, when given)."""
    directory = pathlib.Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{manifest} is unreadable ({type(e).__name__})") from None
        listing = {name: entry["sha256"] for name, entry in files.items()}
    else:
        roots = [directory / p for p in subpaths] or [directory]
        paths = sorted(p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
        listing = {p.relative_to(directory).as_posix(): file_sha256(p) for p in paths}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
