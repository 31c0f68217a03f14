"""Frame shards: decoded video clips stored once, read many times by training and evaluation.

A shard directory holds ArrayRecord files (one record per clip) and ``manifest.json``. A record is

    b"LVAF" | uint32 little-endian header length | header (UTF-8 JSON) | frame 0 bytes | frame 1 bytes | ...

where the header carries ``schema_version``, ``uid``, ``video_id``, ``start_sec``/``end_sec``, ``fps`` (the rate
frame indices refer to), ``frame_indices`` (absolute, in the uncut video), ``duration_sec`` (what the prompt's
time instruction reports), ``codec`` (jpeg or png), ``frame_nbytes`` and free-form ``extra``. The manifest lists
every shard with its record count, byte size and uids, plus the extraction settings, so a truncated or replaced
file is caught when the directory is opened, not mid-training.

ArrayRecord's reader does not complain about a truncated file (it reports zero records), hence the explicit size
and count checks in ``FrameShards``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module
from PIL import Image

SCHEMA_VERSION = 1
FORMAT_NAME = "llavaction_jax.frame_shards"
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
CODECS = ("jpeg", "png")
DEFAULT_JPEG_QUALITY = 95
_MAGIC = b"LVAF"
_HEADER_LEN = struct.Struct("<I")
# One record per group: any clip can be read without decoding its neighbours. The frames are already JPEG/PNG,
# so compressing again would only cost time.
_WRITER_OPTIONS = "group_size:1,uncompressed"


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    uid: str
    video_id: str
    start_sec: float
    end_sec: float
    fps: float
    frame_indices: tuple[int, ...]
    frames: tuple[bytes, ...]  # encoded images, one per frame index; decode with decode_frames
    codec: str
    duration_sec: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames)


def encode_frames(frames: np.ndarray, codec: str = "jpeg", quality: int = DEFAULT_JPEG_QUALITY) -> tuple[bytes, ...]:
    """uint8 (T, H, W, 3) -> one JPEG or PNG per frame.

    JPEG uses 4:4:4 chroma (``subsampling=0``): PIL's default 4:2:0 halves colour resolution, a loss the model
    never saw upstream (it decoded the MP4 directly). PNG is lossless.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        if codec == "jpeg":
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling=0)
        else:
            Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)  # fast; size barely differs
        encoded.append(buffer.getvalue())
    return tuple(encoded)


def decode_frames(record: ClipRecord) -> np.ndarray:
    """The clip's frames as uint8 (T, H, W, 3); an undecodable or odd-sized frame raises naming the uid."""
    if not record.frames:
        raise ValueError(f"clip {record.uid!r} has no frames")
    out = None
    for i, data in enumerate(record.frames):
        try:
            with Image.open(io.BytesIO(data)) as image:
                # No convert() for RGB images: it would copy every frame once more (this is the pipeline's hot loop).
                frame = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
            raise ValueError(f"clip {record.uid!r}: frame {i} (video frame {record.frame_indices[i]}) is not a "
                             f"decodable {record.codec} image: {error}") from error
        if out is None:
            out = np.empty((len(record.frames), *frame.shape), np.uint8)
        elif frame.shape != out.shape[1:]:
            raise ValueError(f"clip {record.uid!r}: frame {i} is {frame.shape}, frame 0 is {out.shape[1:]}")
        out[i] = frame
    return out


def serialize_record(record: ClipRecord) -> bytes:
    if len(record.frames) != len(record.frame_indices):
        raise ValueError(f"clip {record.uid!r}: {len(record.frames)} frames but {len(record.frame_indices)} indices")
    header = {
        "schema_version": SCHEMA_VERSION,
        "uid": record.uid,
        "video_id": record.video_id,
        "start_sec": record.start_sec,
        "end_sec": record.end_sec,
        "fps": record.fps,
        "frame_indices": [int(i) for i in record.frame_indices],
        "codec": record.codec,
        "duration_sec": record.duration_sec,
        "frame_nbytes": [len(f) for f in record.frames],
        "extra": record.extra,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_MAGIC, _HEADER_LEN.pack(len(header_bytes)), header_bytes, *record.frames])


def parse_record(data: bytes, where: str = "record") -> ClipRecord:
    """Inverse of ``serialize_record``; ``where`` (e.g. "shard-00003 record 17") goes into error messages."""
    if data[:4] != _MAGIC:
        raise ValueError(f"{where}: not a frame-shard record (starts with {bytes(data[:4])!r}, expected {_MAGIC!r})")
    (header_len,) = _HEADER_LEN.unpack_from(data, 4)
    body = 4 + _HEADER_LEN.size + header_len
    try:
        header = json.loads(bytes(data[4 + _HEADER_LEN.size:body]))
    except ValueError as error:
        raise ValueError(f"{where}: unreadable record header: {error}") from error
    if header.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{where}: record schema_version {header.get('schema_version')!r}, this reader knows "
                         f"{SCHEMA_VERSION}")
    sizes = header["frame_nbytes"]
    if body + sum(sizes) != len(data):
        raise ValueError(f"{where} (clip {header['uid']!r}): {len(data) - body} frame bytes, header says {sum(sizes)}")
    offsets = np.cumsum([body, *sizes]).tolist()
    frames = tuple(bytes(data[a:b]) for a, b in zip(offsets[:-1], offsets[1:]))
    return ClipRecord(
        uid=header["uid"], video_id=header["video_id"], start_sec=header["start_sec"], end_sec=header["end_sec"],
        fps=header["fps"], frame_indices=tuple(header["frame_indices"]), frames=frames, codec=header["codec"],
        duration_sec=header["duration_sec"], extra=header["extra"],
    )


class ShardWriter:
    """Writes one ArrayRecord shard under a temporary name and renames it into place on ``commit``.

    A shard file with its final name is therefore always complete; an interrupted write leaves only a
    ``*.tmp-<pid>`` file, which a resumed extraction ignores and overwrites.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._writer = array_record_module.ArrayRecordWriter(str(self._tmp), _WRITER_OPTIONS)
        self._uids: list[str] = []

    def write(self, record: ClipRecord) -> None:
        self._writer.write(serialize_record(record))
        self._uids.append(record.uid)

    def commit(self) -> dict[str, Any]:
        """Close and rename; returns the manifest entry for this shard."""
        self._writer.close()
        os.replace(self._tmp, self.path)
        return {"file": self.path.name, "num_records": len(self._uids), "num_bytes": self.path.stat().st_size,
                "uids": list(self._uids)}

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def write_manifest(directory: str | os.PathLike, shards: Sequence[dict], settings: dict, frames_per_clip: int | None,
                   num_failed_clips: int = 0, extra: dict | None = None) -> pathlib.Path:
    """Write ``manifest.json`` (atomically) for ``shards`` (entries from ``ShardWriter.commit``); ``extra`` keys
    (e.g. extract-frames' fps_mismatches) are added at the top level."""
    directory = pathlib.Path(directory)
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "num_clips": sum(s["num_records"] for s in shards),
        "num_failed_clips": num_failed_clips,
        "frames_per_clip": frames_per_clip,
        "settings": settings,
        "shards": list(shards),
        **(extra or {}),
    }
    tmp = directory / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / MANIFEST_NAME)
    return directory / MANIFEST_NAME


def read_manifest(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a frame-shard directory, or its extraction "
                                "has not finished (rerun extract-frames to complete it)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} schema_version "
                         f"{manifest.get('schema_version')!r}, expected {FORMAT_NAME!r} {SCHEMA_VERSION}")
    return manifest


def check_shard_file(path: pathlib.Path, num_records: int, num_bytes: int) -> None:
    """Raise naming ``path`` if it is missing, truncated or not the ArrayRecord file the manifest describes."""
    if not path.is_file():
        raise FileNotFoundError(f"frame shard {path} listed in {MANIFEST_NAME} is missing")
    size = path.stat().st_size
    if size != num_bytes:
        raise ValueError(f"frame shard {path} is {size} bytes, {MANIFEST_NAME} says {num_bytes}: truncated or replaced")
    reader = array_record_module.ArrayRecordReader(str(path))
    found = reader.num_records() if reader.ok() else 0
    problem = ""
    try:
        reader.close()  # a damaged file reports its error here
    except RuntimeError as error:
        problem = f" ({error})"
    if problem or found != num_records:
        raise ValueError(f"frame shard {path} is unreadable or holds {found} records, {MANIFEST_NAME} says "
                         f"{num_records}{problem}")


class FrameShards:
    """Random access to the clips of a shard directory: ``len``, ``[i]``, ``lookup(uid)``.

    Opening checks every shard against the manifest (present, byte size, record count). Reading checks each record
    against the manifest (uid, frame count). Picklable, so it can serve as a Grain data source in worker processes
    (readers are reopened there).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self.manifest = read_manifest(self.directory)
        self.frames_per_clip: int | None = self.manifest["frames_per_clip"]
        # The most frames a clip can have: every clip's count, or the cap of 1-fps sampling (frames_upbound).
        upbound = self.manifest.get("settings", {}).get("frames_upbound")
        self.max_frames_per_clip: int | None = self.frames_per_clip or (upbound if upbound and upbound > 0 else None)
        shards = self.manifest["shards"]
        for shard in shards:
            check_shard_file(self.directory / shard["file"], shard["num_records"], shard["num_bytes"])
        self.paths = [str(self.directory / s["file"]) for s in shards]
        self.uids: list[str] = [uid for s in shards for uid in s["uids"]]
        self._shard_starts = np.cumsum([0] + [s["num_records"] for s in shards])
        self._uid_to_index: dict[str, int] | None = None
        self._source = None

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> ClipRecord:
        return self.parse(self.read_bytes(index), index)

    def read_bytes(self, index: int) -> bytes:
        """The raw serialized record ``index`` (what a Grain pipeline moves between processes)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips in {self.directory}")
        if self._source is None:
            # about 0.3 s (it loads absl flags): paid by the processes that read records, not by every importer
            from array_record.python import array_record_data_source  # noqa: PLC0415

            self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        try:
            return self._source[index]
        except RuntimeError as error:  # e.g. "Corrupted Riegeli/records file: ... hash mismatch": name the shard
            raise ValueError(f"{self._where(index)}: unreadable ({str(error).splitlines()[0]})") from None

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        return f"frame shard {self.paths[shard]} record {index - self._shard_starts[shard]}"

    def parse(self, data: bytes, index: int) -> ClipRecord:
        """Parse record ``index`` and check it against the manifest."""
        where = self._where(index)
        record = parse_record(data, where)
        if record.uid != self.uids[index]:
            raise ValueError(f"{where}: uid {record.uid!r}, {MANIFEST_NAME} says {self.uids[index]!r}")
        if self.frames_per_clip is not None and record.num_frames != self.frames_per_clip:
            raise ValueError(f"clip {record.uid!r} ({where}) has {record.num_frames} frames, {MANIFEST_NAME} says "
                             f"every clip has {self.frames_per_clip}")
        return record

    def index_of(self, uid: str) -> int:
        if self._uid_to_index is None:
            self._uid_to_index = {u: i for i, u in enumerate(self.uids)}
        try:
            return self._uid_to_index[uid]
        except KeyError:
            raise KeyError(f"clip uid {uid!r} is not in {self.directory}") from None

    def lookup(self, uid: str) -> ClipRecord:
        return self[self.index_of(uid)]

    def __contains__(self, uid: str) -> bool:
        try:
            self.index_of(uid)
        except KeyError:
            return False
        return True

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None  # reader handles do not pickle; reopened on first read
        return state

    def __repr__(self) -> str:
        return f"FrameShards({str(self.directory)!r}, clips={len(self)}, shards={len(self.paths)})"


class ShardSet:
    """Several shard directories read as one: a training mixture's EK100 clips (ek100 sampling) and its
    LLaVA-Video-178K videos (1-fps sampling) are extracted with different rules into different folders.

    Offers what the training pipeline uses of ``FrameShards``: ``lookup(uid)``, ``in``, ``directory`` (for
    messages), ``frames_per_clip`` (when every folder agrees) and ``max_frames_per_clip`` (the largest). A uid held by
    two folders is refused, naming both. Picklable like its parts."""

    def __init__(self, directories: Sequence[str | os.PathLike]):
        if not directories:
            raise ValueError("ShardSet needs at least one shard directory")
        self.parts = [FrameShards(d) for d in directories]
        self.directory = ", ".join(str(p.directory) for p in self.parts)
        counts = {p.frames_per_clip for p in self.parts}
        self.frames_per_clip: int | None = counts.pop() if len(counts) == 1 else None
        maxima = [p.max_frames_per_clip for p in self.parts]
        self.max_frames_per_clip: int | None = None if None in maxima else max(maxima)
        self._part_of: dict[str, int] = {}
        for i, part in enumerate(self.parts):
            for uid in part.uids:
                other = self._part_of.setdefault(uid, i)
                if other != i:
                    raise ValueError(f"clip uid {uid!r} is in two shard directories: {self.parts[other].directory} "
                                     f"and {part.directory}")

    def __len__(self) -> int:
        return len(self._part_of)

    def lookup(self, uid: str) -> ClipRecord:
        if uid not in self._part_of:
            raise KeyError(f"clip uid {uid!r} is not in {self.directory}")
        return self.parts[self._part_of[uid]].lookup(uid)

    def __contains__(self, uid: str) -> bool:
        return uid in self._part_of

    def __repr__(self) -> str:
        return f"ShardSet({[str(p.directory) for p in self.parts]}, clips={len(self)})"


def open_shards(spec) -> FrameShards | ShardSet | None:
    """A shard directory, a comma-separated list of them (``data.shards=a,b``) or a sequence -> one reader; None or
    "" -> None (text-only data)."""
    if spec is None or isinstance(spec, (FrameShards, ShardSet)):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        spec = [s.strip() for s in str(spec).split(",") if s.strip()]
    directories = list(spec)
    if not directories:
        return None
    return FrameShards(directories[0]) if len(directories) == 1 else ShardSet(directories)
