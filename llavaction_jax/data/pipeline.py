"""Grain input pipeline over frame shards: clips in, batches of model-ready pixel values out.

    FrameShards (ArrayRecord) -> MapDataset -> seeded shuffle -> repeat -> this process's slice
    -> decode JPEG/PNG -> resize if the shards hold another size -> normalize as upstream
    -> optional worker processes -> batch

Deterministic: the order depends only on the seed, the epoch and the process index/count (not on the number of
worker processes), and an iterator's ``get_state()`` restored with ``set_state()`` continues exactly where it
stopped. Each of ``process_count`` processes reads a disjoint slice; every process gets the same number of clips
per epoch (the epoch is cut to a multiple of ``process_count``), so hosts never wait on a peer that ran out.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from llavaction_jax.data.frames import ClipRecord, FrameShards, decode_frames
from llavaction_jax.data.image import SIGLIP_SIZE, normalize_frames, resize_frames


@dataclasses.dataclass(frozen=True)
class FramePipelineConfig:
    batch_size: int  # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None repeats forever (training); each epoch is shuffled differently
    frame_size: int = SIGLIP_SIZE  # frames stored at another size are squashed like upstream (PIL bicubic)
    drop_remainder: bool = True  # static batch shapes for jit
    worker_count: int = 0  # Grain worker processes; 0 decodes in this process (with read_threads threads)
    read_threads: int = 4


@dataclasses.dataclass(frozen=True)
class DecodeClip(grain.transforms.Map):
    """ClipRecord -> {"pixel_values": float32 (T, 3, S, S), "frame_indices": int32 (T,), "uid": str}.

    A module-level class so Grain can pickle it into worker processes.
    """

    frame_size: int = SIGLIP_SIZE

    def map(self, record: ClipRecord) -> dict:
        frames = decode_frames(record)
        if self.frame_size and frames.shape[1:3] != (self.frame_size, self.frame_size):
            frames = resize_frames(frames, self.frame_size)
        return {
            "pixel_values": normalize_frames(frames),
            "frame_indices": np.asarray(record.frame_indices, np.int32),
            "uid": record.uid,
        }


def clip_dataset(
    shards: FrameShards | str, config: FramePipelineConfig, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's shuffled, decoded clips (unbatched), as a MapDataset."""
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415 (only needed when the caller leaves the process layout to JAX)

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    source = shards if isinstance(shards, FrameShards) else FrameShards(shards)
    if source.frames_per_clip is None and config.batch_size > 1:
        raise ValueError(f"{source.directory}: clips have varying frame counts (manifest frames_per_clip is null); "
                         "they cannot be batched together")
    per_epoch = len(source) // process_count * process_count
    if per_epoch == 0:
        raise ValueError(f"{source.directory} holds {len(source)} clips, fewer than the {process_count} processes")
    dataset = grain.MapDataset.source(source)
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    dataset = dataset[:per_epoch]  # equal share per process; the clips cut rotate with each epoch's shuffle
    dataset = dataset.repeat(config.num_epochs)
    dataset = dataset[process_index::process_count]
    return dataset.map(DecodeClip(config.frame_size))


def batch_dataset(
    shards: FrameShards | str, config: FramePipelineConfig, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of ``config.batch_size`` clips: {"pixel_values": (B, T, 3, S, S), "frame_indices": (B, T), "uid": (B,)}.

    Iterate it (``it = iter(ds)``); ``it.get_state()`` / ``it.set_state(state)`` save and restore the position.
    """
    clips = clip_dataset(shards, config, process_index, process_count)
    read_options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=2 * config.batch_size)
    elements = clips.to_iter_dataset(read_options)
    if config.worker_count > 0:
        # Workers decode every n-th clip and Grain interleaves them back in order; batching afterwards, here,
        # keeps batches identical for any worker count (batching inside workers would drop a remainder per worker).
        elements = elements.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return elements.batch(config.batch_size, drop_remainder=config.drop_remainder)
