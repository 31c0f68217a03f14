"""Orbax checkpoints written and read a bounded slice at a time, so converting takes the same memory at any size.

Writing: the params tree holds `StreamedParam` leaves (shape, dtype, a reader of any slice). They are saved with
Orbax's own `Checkpointer(PyTreeCheckpointHandler)`, which lays out the checkpoint and writes all of its metadata
(pytree metadata, step metadata, the OCDBT manifests and their per-process merge); a `TypeHandler` registered
for `StreamedParam` (public Orbax API: `type_handlers.create_type_handler_registry`) creates each zarr3 array
from Orbax's own tensorstore spec (`type_handlers.get_json_tspec_write`) and fills it chunk by chunk, at most
`buffer_bytes` of chunks in flight. The handler reports the `jax.Array` type, so the checkpoint restores like any
other (`checkpoint_io.restore_params`), with whatever shardings the reader asks for.

Chunks: the stored chunk of an array is at most `buffer_bytes / 4`, a divisor of its shard on the mesh (so no two
processes ever write one chunk), and is cut first across layers, then along the axis that is the torch tensor's
first one (`keys.torch_row_axis`), where a slice of the source is contiguous bytes. On a pod each process writes
only the chunks of the shards whose first device it owns.

Reading (`StoredArrays`): tensorstore opened from Orbax's read spec (`type_handlers.get_json_tspec_read`),
block by block, each block a whole number of stored chunks. A checkpoint written whole by a plain Orbax save
(`checkpoint_io.save_model`, or this converter before streaming) has one chunk per array, so reading it
takes that array's size in memory; it still reads correctly, each byte once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
import pathlib
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers

from llavaction_jax.tree import flatten_paths

DEFAULT_BUFFER_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedParam:
    """A parameter not yet read: Orbax saves it by asking `read` for one stored chunk at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]  # stored chunk shape
    blocks: tuple[tuple[slice, ...], ...]  # the chunks this process writes
    read: Callable[[tuple[slice, ...]], np.ndarray]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def chunk_shape(shard: tuple[int, ...], itemsize: int, limit: int, priority: list[int]) -> tuple[int, ...]:
    """The largest chunk dividing `shard` with at most `limit` bytes, cutting the axes in `priority` order."""
    chunk = list(shard)
    for axis in priority + [d for d in range(len(shard)) if d not in priority]:
        rest = math.prod(chunk) // max(chunk[axis], 1) * itemsize
        if rest * chunk[axis] <= limit:
            break
        chunk[axis] = max([d for d in range(1, shard[axis] + 1) if shard[axis] % d == 0 and d * rest <= limit], default=1)
    return tuple(chunk)


def owned_blocks(shape: tuple[int, ...], sharding, chunk: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """The chunks of the shards that this process writes: each distinct shard once, by its lowest-id device."""
    owner: dict[tuple, object] = {}
    for device, index in sorted(sharding.devices_indices_map(shape).items(), key=lambda kv: kv[0].id):
        owner.setdefault(tuple(s.indices(n)[:2] for s, n in zip(index, shape)), device)
    mine = [k for k, d in owner.items() if d.process_index == jax.process_index()]
    blocks = []
    for bounds in sorted(mine):
        starts = [range(a, b, c) for (a, b), c in zip(bounds, chunk)]
        blocks += [tuple(slice(s, min(s + c, b)) for s, c, (_, b) in zip(corner, chunk, bounds))
                   for corner in itertools.product(*starts)]
    return tuple(blocks)


class StreamedParamHandler(type_handlers.ArrayHandler):
    """Saves StreamedParam leaves as jax.Array checkpoint entries, one stored chunk at a time."""

    def __init__(self, buffer_bytes: int):
        super().__init__(array_metadata_store=None)
        self._buffer_bytes = buffer_bytes

    async def serialize(self, values, infos, args=None):
        args = args or [type_handlers.SaveArgs()] * len(values)
        for info in infos:
            await info.await_path_creation()
        await asyncio.to_thread(_write_all, values, infos, args, self._buffer_bytes)
        return []


def _write_all(values, infos, args, buffer_bytes: int) -> None:
    in_flight: collections.deque = collections.deque()
    held = 0
    for value, info, arg in zip(values, infos, args):
        ocdbt = bool(info.is_ocdbt_checkpoint)
        spec = ts.Spec(type_handlers.get_json_tspec_write(
            info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=value.chunk, dtype=np.dtype(value.dtype),
            process_index=jax.process_index() if ocdbt else None, arg=arg))
        if jax.process_index() == 0:  # one process creates the array's metadata, as Orbax's own ArrayHandler does
            ts.open(spec, create=True, open=True, context=info.ts_context).result()
        store = ts.open(spec, open=True, assume_metadata=True, context=info.ts_context).result()
        for index in value.blocks:
            data = value.read(index)
            while in_flight and held + data.nbytes > buffer_bytes:
                future, n = in_flight.popleft()
                future.result()
                held -= n
            in_flight.append((store[index].write(data, can_reference_source_data_indefinitely=True), data.nbytes))
            held += data.nbytes
    for future, _ in in_flight:
        future.result()


def save_streamed(directory: pathlib.Path, tree: dict, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                  compress: bool = False) -> None:
    """Save a tree of StreamedParam as an Orbax pytree checkpoint at `directory` (new), zarr3 + OCDBT."""
    registry = ocp.type_handlers.create_type_handler_registry((StreamedParam, StreamedParamHandler(buffer_bytes)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=compress,
                                          type_handler_registry=registry)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))


class StoredArrays:
    """The arrays of an Orbax pytree checkpoint, each readable by slices through tensorstore."""

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory).absolute()
        meta = ocp.PyTreeCheckpointHandler().metadata(self.directory)
        self._use_zarr3 = bool(meta.use_zarr3)
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
        tree = dict(meta.tree)
        self._names = flatten_paths(ocp.tree.get_param_names(tree))
        self.params = {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten_paths(tree).items()}
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)

    def open(self, path: str):
        # the checkpoint's one TensorStore context (Orbax warns about a ParamInfo without one, once per array)
        info = type_handlers.ParamInfo(name=self._names[path], parent_dir=epath.Path(self.directory),
                                       is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._use_zarr3,
                                       ts_context=self._context)
        spec = type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
        return ts.open(ts.Spec(spec), open=True, read=True, context=self._context).result()


def read_blocks(store, axes: list[int], limit: int):
    """Yield (index, array) covering `store` in blocks of whole stored chunks, at most `limit` bytes where the
    chunks allow, cut along `axes` in order (other axes whole); the next block is read while one is used."""
    shape = tuple(store.shape)
    stored = tuple(store.chunk_layout.read_chunk.shape or shape)
    itemsize = np.dtype(store.dtype.numpy_dtype).itemsize
    block = list(shape)
    for axis in axes:
        rest = math.prod(block) // max(block[axis], 1) * itemsize
        if rest * block[axis] <= limit:
            break
        step = min(stored[axis], shape[axis])
        block[axis] = max(step, (limit // max(rest, 1)) // step * step)
    indices = [tuple(slice(s, min(s + b, n)) for s, b, n in zip(corner, block, shape))
               for corner in itertools.product(*(range(0, n, b) for n, b in zip(shape, block)))]
    pending = store[indices[0]].read() if indices else None
    for k, index in enumerate(indices):
        data = pending.result()
        pending = store[indices[k + 1]].read() if k + 1 < len(indices) else None
        yield index, data
