"""Streaming safetensors I/O: a reader over one file or index-json shards, and a header-first writer.

Why not `safetensors.safe_open`: it memory-maps whole files, and every page a read touches stays resident in the
process until the file is closed, so reading a 5 GB shard tensor by tensor grows RSS to 5 GB (measured). Here
tensors are read with `os.preadv` straight into numpy buffers, so memory is only what the caller keeps, and a
slice read fetches only the byte runs of that slice (what each host of a pod needs).

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON header
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces, then the
raw little-endian C-order tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import struct
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit too


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed, truncated or inconsistent (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    key: str
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: pathlib.Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and validate one file's header; a file shorter than its header promises is a clear error."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    entries, spans = {}, []
    for key, info in header.items():
        try:
            dtype, shape, (begin, stop) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            begin, stop = int(begin), int(stop)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {key!r} has a malformed header entry {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if stop - begin != nbytes:
            raise SafetensorsError(f"{path}: tensor {key!r} spans {stop - begin} bytes, its shape needs {nbytes}")
        entries[key] = TensorEntry(key, path, dtype, shape, 8 + n + begin, nbytes)
        spans.append((begin, stop, key))
    end = _check_tiling(path, spans)
    if 8 + n + end < size:
        raise SafetensorsError(f"{path}: {size - 8 - n - end} bytes after the last tensor that no tensor covers")
    if 8 + n + end > size:
        cut = sorted(k for k, e in entries.items() if e.offset + e.nbytes > size)
        raise SafetensorsError(f"{path}: truncated: {size} bytes but its header needs {8 + n + end}; "
                               f"tensors cut off: {cut[:5]}{' ...' if len(cut) > 5 else ''}")
    return entries, metadata


def _check_tiling(path: pathlib.Path, spans: list[tuple[int, int, str]]) -> int:
    """The tensors' byte ranges must tile the data area: sorted by offset, each begins where the previous ends.

    The reference reader (safetensors' Rust `Metadata::validate`) rejects the same files: overlapping ranges
    would silently alias two tensors (one would read the other's bytes), gaps hide unread bytes.
    """
    end, previous = 0, None
    for begin, stop, key in sorted(spans):
        if begin != end:
            where = f"after tensor {previous!r} ending at {end}" if previous else "at the start of the data"
            kind = "overlaps the tensor before it" if begin < end else "leaves a gap"
            raise SafetensorsError(f"{path}: tensor {key!r} has invalid data_offsets [{begin}, {stop}]: it {kind} "
                                   f"({where})")
        end, previous = stop, key
    return end


def checkpoint_files(directory: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory and, if sharded, its weight map."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{index}: not a safetensors index ({e!r})") from None
        files = sorted({directory / name for name in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise SafetensorsError(f"{index} names shard files that do not exist: {absent}")
        return files, weight_map
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SafetensorsError(pickles_not_read(directory) or
                               f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    return files, None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickles_not_read(directory: pathlib.Path) -> str | None:
    """The refusal for a directory whose weights are only in PyTorch pickle files (no safetensors), else None."""
    directory = pathlib.Path(directory)
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles or any(directory.glob("*.safetensors")):
        return None
    return (f"{directory} holds PyTorch pickle files ({', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''}) "
            "but no safetensors: pickles are not read (loading one can run arbitrary code). Convert them to "
            "safetensors where you trust them, e.g. transformers' save_pretrained(..., safe_serialization=True)")


def refuse_pickles(directory) -> None:
    """Raise SafetensorsError for a directory of pickled weights, before any of its files is read."""
    message = pickles_not_read(pathlib.Path(directory)) if pathlib.Path(directory).is_dir() else None
    if message:
        raise SafetensorsError(message)


class SafetensorsCheckpoint:
    """Every tensor of a checkpoint (a file, or a directory of one file or shards), read on demand.

    `bytes_read` counts what was actually fetched, so callers can report progress and tests can check that a
    pod host read only its slices.
    """

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        files, weight_map = ([path], None) if path.is_file() else checkpoint_files(path)
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[pathlib.Path, dict] = {}
        for file in files:
            entries, self.metadata[file] = read_header(file)
            for key, entry in entries.items():
                if key in self.entries:
                    raise SafetensorsError(f"tensor {key!r} is in both {self.entries[key].file} and {file}")
                self.entries[key] = entry
        for key, name in (weight_map or {}).items():
            if key not in self.entries or self.entries[key].file.name != name:
                raise SafetensorsError(f"{path / INDEX_FILE}: {key!r} should be in {name} but that file lacks it")
        self.bytes_read = 0
        self._fds: dict[pathlib.Path, int] = {}

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, key: str) -> np.ndarray:
        return self.read_slice(key, ())

    def read_slice(self, key: str, index: Sequence[slice]) -> np.ndarray:
        """tensor[index] for a tuple of unit-step slices (missing trailing dims = whole), reading only its runs.

        The slice is a set of contiguous byte runs: everything after the last partially selected dimension is
        whole, so each run covers that dimension's selected range times the trailing block.
        """
        e = self.entries[key]
        bounds = _bounds(index, e.shape, key)
        out = np.empty(tuple(b - a for a, b in bounds), e.dtype)
        if out.size == 0:
            return out
        partial = [d for d, (a, b) in enumerate(bounds) if (a, b) != (0, e.shape[d])]
        last = partial[-1] if partial else 0
        block = math.prod(e.shape[last + 1:]) if e.shape else 1
        strides = [math.prod(e.shape[d + 1:]) for d in range(len(e.shape))]
        run = (bounds[last][1] - bounds[last][0]) * block * e.dtype.itemsize if e.shape else e.nbytes
        buf = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        for prefix in itertools.product(*(range(a, b) for a, b in bounds[:last])):
            start = sum(i * s for i, s in zip(prefix, strides)) + (bounds[last][0] * strides[last] if e.shape else 0)
            self._pread_into(e, buf[pos:pos + run], e.offset + start * e.dtype.itemsize)
            pos += run
        return out

    def _pread_into(self, e: TensorEntry, buf: memoryview, offset: int) -> None:
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        done = 0
        while done < len(buf):  # one read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise SafetensorsError(f"{e.file}: truncated while reading tensor {e.key!r}")
            done += n
        self.bytes_read += done


def _bounds(index: Sequence[slice], shape: tuple[int, ...], key: str) -> list[tuple[int, int]]:
    if len(index) > len(shape):
        raise IndexError(f"{key}: index {index} has more dimensions than shape {shape}")
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise IndexError(f"{key}: only unit-step slices can be read, got {s}")
        out.append((start, max(start, stop)))
    return out


# ---------------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class SafetensorsWriter:
    """Writes one file whose header is known up front; tensors may then arrive in any order (positional writes).

    Closing checks that every announced tensor was written, so a partial file is never mistaken for a whole one.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict | None = None):
        self.path = pathlib.Path(path)
        header, offset, self._where = {}, 0, {}
        for s in specs:
            header[s.key] = {"dtype": DTYPE_NAMES[np.dtype(s.dtype)], "shape": list(s.shape),
                             "data_offsets": [offset, offset + s.nbytes]}
            self._where[s.key] = (s, offset)
            offset += s.nbytes
        header["__metadata__"] = {"format": "pt", **(metadata or {})}  # transformers refuses files without it
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self._data_start = 8 + len(raw)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self._data_start + offset)
        self._pending = set(self._where)
        self._written: dict[str, int] = {}

    def write(self, key: str, array: np.ndarray, row: int = 0) -> None:
        """Write `array` as the tensor `key`, or as its rows `row:row + len(array)` (a contiguous block)."""
        spec, offset = self._where[key]
        rows = spec.shape[0] if spec.shape else 1
        count = array.shape[0] if array.shape else 1
        if (array.ndim != len(spec.shape) or tuple(array.shape[1:]) != spec.shape[1:]
                or array.dtype != np.dtype(spec.dtype) or row + count > rows):
            raise ValueError(f"{self.path}: {key} announced as {spec.shape} {np.dtype(spec.dtype).name}, "
                             f"got {tuple(array.shape)} {array.dtype.name} at row {row}")
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        start = offset + (row * (spec.nbytes // rows) if rows else 0)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._data_start + start + done)
        self._written[key] = self._written.get(key, 0) + len(data)
        if self._written[key] >= spec.nbytes:
            self._pending.discard(key)

    def close(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self._pending:
            raise SafetensorsError(f"{self.path}: closed before these tensors were written: {sorted(self._pending)[:5]}")


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_index(directory: pathlib.Path, shards: Sequence[Sequence[TensorSpec]]) -> None:
    names = shard_names(len(shards))
    index = {"metadata": {"total_size": sum(s.nbytes for shard in shards for s in shard)},
             "weight_map": {s.key: name for name, shard in zip(names, shards) for s in shard}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
