"""Verify a PyTorch checkpoint directory before converting it, against whatever recorded its files' digests.

1. Our `checksums.json` (an export of ours, `convert to-torch`): every listed file must match (integrity.py).
2. The Hugging Face hub's own records, so a downloaded checkpoint is verified too: in the hub cache a snapshot's
   files are links to `blobs/<digest>` (sha256 for LFS files such as safetensors, the git blob sha1 for small
   files); `huggingface-cli download --local-dir` keeps the same digest as the etag in
   `.cache/huggingface/download/<file>.metadata`. Every top-level file must have one and match it.

A mismatch raises IntegrityError naming the file. A directory with neither record is converted with one warning,
and its conversion gets no `checksums.json` (integrity.py: a manifest only vouches for verified bytes).
"""

from __future__ import annotations

import hashlib
import pathlib
import re

from llavaction_jax import integrity

_HEX = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def _git_blob_sha1(path: pathlib.Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_digest(directory: pathlib.Path, file: pathlib.Path) -> str | None:
    """The hub's digest of `file`: its cache blob's name, or the etag of its local-dir download metadata."""
    if file.is_symlink():
        target = file.resolve()
        if target.parent.name == "blobs" and _HEX.match(target.name):
            return target.name
    metadata = directory / ".cache" / "huggingface" / "download" / f"{file.name}.metadata"
    if metadata.is_file():
        lines = metadata.read_text().splitlines()
        etag = lines[1].strip().strip('"') if len(lines) > 1 else ""
        if _HEX.match(etag):
            return etag
    return None


def _hub_verified(directory: pathlib.Path) -> tuple[bool, list[str]]:
    """(every top-level file matched a hub digest, the files that had none); IntegrityError on a mismatch."""
    unrecorded = []
    for file in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        expected = _recorded_digest(directory, file)
        if expected is None:
            unrecorded.append(file.name)
            continue
        actual = integrity.file_sha256(file) if len(expected) == 64 else _git_blob_sha1(file)
        if actual != expected:
            raise integrity.IntegrityError(f"{file} is corrupt: its digest differs from the one the Hugging Face hub "
                                           f"recorded for it ({expected[:12]}...)")
    return not unrecorded, unrecorded


def verify_source(src) -> bool:
    """True when every file of `src` was verified (our manifest or the hub's records); False, with one warning,
    when nothing records digests; IntegrityError when a file differs from its record."""
    directory = pathlib.Path(src)
    if integrity.has_manifest(directory):
        return integrity.verify_manifest(directory)
    verified, unrecorded = _hub_verified(directory)
    if verified:
        return True
    return integrity.verify_or_warn(directory, f"nor Hugging Face hub digests for {', '.join(unrecorded[:3])}"
                                               f"{' ...' if len(unrecorded) > 3 else ''}; its conversion gets no "
                                               f"{integrity.MANIFEST} either")
