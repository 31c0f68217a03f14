"""Grain input pipelines over frame shards.

Frames only (``batch_dataset``: evaluation tools, benchmarks):

    FrameShards (ArrayRecord) -> MapDataset -> seeded shuffle -> repeat -> this process's slice
    -> decode JPEG/PNG -> resize if the shards hold another size -> normalize as upstream
    -> optional worker processes -> batch

Training (``train_dataset``): samples (``mixture.load_mixture``) joined to their clips (``train_sample.clip_uid``):

    samples -> MapDataset -> seeded shuffle -> repeat -> this process's slice
    -> look up the clip by uid, decode JPEG/PNG, resize if needed; tokens + labels (preprocess_qwen), truncation
       (train_sample.py; a bad sample raises or, with on_bad_sample="skip", becomes a marker)
    -> to IterDataset (reader threads) -> optional worker processes
    -> drop + count skipped samples, batch, normalize frames into the batch, pad to length buckets (batching.py)
    -> make_global_batch (batching.py): per-process numpy batches -> global jax Arrays

Deterministic: the order depends only on the seed, the epoch and the process index/count (not on the number of
worker processes), and an iterator's ``get_state()`` restored with ``set_state()`` continues exactly where it
stopped. Each of ``process_count`` processes reads a disjoint slice; every process gets the same number of clips
per epoch (the epoch is cut to a multiple of ``process_count``), so hosts never wait on a peer that ran out.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import numpy as np

from llavaction_jax.data.batching import QWEN_PAD_ID, PaddedBatchIterDataset, power_of_two_buckets
from llavaction_jax.data.frames import ClipRecord, FrameShards, ShardSet, decode_frames, open_shards
from llavaction_jax.data.image import DEFAULT_FRAME_SIZE, DEFAULT_PREPROCESSING, normalize_frames, resize_frames
from llavaction_jax.data.length_grouping import LengthGroupedEpochs, modality_lengths
from llavaction_jax.data.train_sample import EncodeTrainSample, QuestionPrompts, TagEpoch, cached_tokenizer
from llavaction_jax.host import reader_threads
from llavaction_jax.vision_towers import Preprocessing


@dataclasses.dataclass(frozen=True)
class FramePipelineConfig:
    batch_size: int  # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None repeats forever (training); each epoch is shuffled differently
    frame_size: int = DEFAULT_FRAME_SIZE  # frames stored at another size are squashed like upstream (PIL bicubic)
    drop_remainder: bool = True  # static batch shapes for jit
    worker_count: int = 0  # Grain worker processes; 0 decodes in this process (with read_threads threads)
    read_threads: int = 0  # 0: host.reader_threads() (half the cores, 1 to 4)
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING  # the vision tower's (vision_towers.py)


@dataclasses.dataclass(frozen=True)
class DecodeClip(grain.transforms.Map):
    """ClipRecord -> {"pixel_values": float32 (T, 3, S, S), "frame_indices": int32 (T,), "uid": str}.

    A module-level class so Grain can pickle it into worker processes.
    """

    frame_size: int = DEFAULT_FRAME_SIZE
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING

    def map(self, record: ClipRecord) -> dict:
        frames = decode_frames(record)
        if self.frame_size and frames.shape[1:3] != (self.frame_size, self.frame_size):
            frames = resize_frames(frames, self.frame_size, self.preprocessing)
        return {
            "pixel_values": normalize_frames(frames, preprocessing=self.preprocessing),
            "frame_indices": np.asarray(record.frame_indices, np.int32),
            "uid": record.uid,
        }


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _this_process_slice(dataset: grain.MapDataset, seed: int, shuffle: bool, num_epochs: int | None,
                        process_index: int, process_count: int, what: str,
                        grouping: tuple[np.ndarray, int, int] | None = None) -> grain.MapDataset:
    """Shuffle (a new order each epoch), repeat, and keep every ``process_count``-th element from ``process_index``.

    The epoch is cut to a multiple of ``process_count`` so every process gets the same number of elements and
    hosts never wait on a peer that ran out; the elements cut rotate with each epoch's shuffle. With ``grouping``
    = (lengths, step_size, group_steps) the shuffle is upstream's length-grouped order (length_grouping.py).
    """
    per_epoch = len(dataset) // process_count * process_count
    if per_epoch == 0:
        raise ValueError(f"{what} holds {len(dataset)} elements, fewer than the {process_count} processes")
    if shuffle and grouping is not None:
        lengths, step_size, group_steps = grouping
        dataset = LengthGroupedEpochs(dataset, lengths, per_epoch, num_epochs, step_size, group_steps, seed)
        return dataset[process_index::process_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset[:per_epoch].repeat(num_epochs)
    return dataset[process_index::process_count]


def clip_dataset(
    shards: FrameShards | str, config: FramePipelineConfig, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's shuffled, decoded clips (unbatched), as a MapDataset."""
    process_index, process_count = _process_layout(process_index, process_count)
    source = shards if isinstance(shards, FrameShards) else FrameShards(shards)
    if source.frames_per_clip is None and config.batch_size > 1:
        raise ValueError(f"{source.directory}: clips have varying frame counts (manifest frames_per_clip is null); "
                         "they cannot be batched together")
    dataset = _this_process_slice(grain.MapDataset.source(source), config.seed, config.shuffle, config.num_epochs,
                                  process_index, process_count, str(source.directory))
    return dataset.map(DecodeClip(config.frame_size, config.preprocessing))


def batch_dataset(
    shards: FrameShards | str, config: FramePipelineConfig, process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of ``config.batch_size`` clips: {"pixel_values": (B, T, 3, S, S), "frame_indices": (B, T), "uid": (B,)}.

    Iterate it (``it = iter(ds)``); ``it.get_state()`` / ``it.set_state(state)`` save and restore the position.
    """
    clips = clip_dataset(shards, config, process_index, process_count)
    read_options = grain.ReadOptions(num_threads=reader_threads(config.read_threads),
                                     prefetch_buffer_size=2 * config.batch_size)
    elements = clips.to_iter_dataset(read_options)
    if config.worker_count > 0:
        # Workers decode every n-th clip and Grain interleaves them back in order; batching afterwards, here,
        # keeps batches identical for any worker count (batching inside workers would drop a remainder per worker).
        elements = elements.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return elements.batch(config.batch_size, drop_remainder=config.drop_remainder)


@dataclasses.dataclass(frozen=True)
class TrainPipelineConfig:
    batch_size: int  # per process
    # The batch's frame count (a static shape): clips with fewer frames are padded and keep their own count, one
    # with more is a bad sample. None: the shards' manifest (frames_per_clip, else its frames_upbound).
    num_frames: int | None = None
    frame_size: int = DEFAULT_FRAME_SIZE
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING  # the vision tower's (vision_towers.py)
    max_length: int = 32768  # text tokens kept per sample (upstream's tokenizer.model_max_length); longer is cut
    length_buckets: tuple[int, ...] | None = None  # None: powers of two from 64 up to max_length
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever (train for a number of steps); each epoch reshuffled
    group_by_length: bool = False  # upstream's group_by_modality_length order (length_grouping.py)
    length_group_steps: int = 1  # steps per sorted megabatch; 1 = upstream, more = less padding (ours)
    drop_remainder: bool = True  # static batch shapes for jit
    on_bad_sample: str = "error"  # "error" raises naming the sample; "skip" drops it, logs it, counts it
    add_time_instruction: bool = True  # the time instruction on every video (upstream default)
    # prompts built at load time for datasets that store questions (EK100: ek100.train_prompt.EK100PromptSettings)
    question_prompts: QuestionPrompts | None = None
    tokenizer_path: str | None = None  # None: the bundled Qwen2 tokenizer
    pad_id: int = QWEN_PAD_ID
    # Parallelism: reader threads scale (JPEG decoding and the normalization lookup release the GIL) up to the cores
    # the step leaves free, and beyond them slow the step (host.reader_threads); worker processes (worker_count > 0,
    # each with read_threads threads) also work but pay for moving decoded frames through shared memory, and were
    # the slower choice in bench/data.py (see BENCHMARKS.md).
    read_threads: int = 0  # 0: host.reader_threads() (half the cores, 1 to 4)
    worker_count: int = 0
    worker_buffer_size: int = 1  # elements each worker prepares ahead (a 64-frame clip is 28 MB of uint8 frames)

    def buckets(self) -> tuple[int, ...]:
        buckets = self.length_buckets or power_of_two_buckets(self.max_length, min(64, self.max_length))
        if list(buckets) != sorted(set(buckets)) or buckets[-1] < self.max_length:
            raise ValueError(f"length_buckets {buckets} must increase and end at max_length {self.max_length} or "
                             "above (a truncated sample must fit the largest bucket)")
        return tuple(buckets)


def train_dataset(
    samples: list[dict], shards: FrameShards | ShardSet | str | None, config: TrainPipelineConfig,
    process_index: int | None = None, process_count: int | None = None,
) -> grain.IterDataset:
    """This process's training batches (schema in ``batching.py``); iterate with ``it = iter(ds)``.

    ``samples`` come from ``mixture.load_mixture``; ``shards`` hold their clips: a directory, several (comma-separated or a list:
    e.g. EK100 clips and LLaVA-Video-178K videos extracted with different sampling), or None for text-only data. The
    order depends only on the seed, the epoch and the process layout (not on worker or thread counts);
    ``it.get_state()`` / ``it.set_state(state)`` save and restore the position, including the skip count.
    The process layout defaults to ``jax.process_index()`` / ``jax.process_count()``.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    # Grain's threads encode the samples beside the training step: HF tokenizers' own thread pool (rayon) would only
    # compete with them and with XLA for the cores (a sample's few short texts gain nothing from it; on 2 cores it
    # cost a fifth more CPU per sample). A value the user set is kept.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    source = open_shards(shards)
    num_frames = config.num_frames or (source.max_frames_per_clip if source is not None else None)
    if num_frames is None:
        raise ValueError("data.num_frames is not set and the shards' manifest gives no frame count (neither "
                         "frames_per_clip nor settings.frames_upbound)")
    encode = EncodeTrainSample(source, cached_tokenizer(config.tokenizer_path), num_frames, config.frame_size,
                               config.max_length, config.add_time_instruction, config.on_bad_sample,
                               config.question_prompts, config.preprocessing)
    grouping = None
    if config.group_by_length:  # one optimizer step = batch_size samples from each process
        grouping = (modality_lengths(samples), config.batch_size * process_count, config.length_group_steps)
    dataset = _this_process_slice(grain.MapDataset.source(samples), config.seed, config.shuffle, config.num_epochs,
                                  process_index, process_count, f"the sample list ({len(samples)} samples)", grouping)
    per_epoch = len(samples) // process_count * process_count
    dataset = dataset.map_with_index(TagEpoch(per_epoch, process_index, process_count))  # for per-epoch coins
    elements = dataset.map(encode).to_iter_dataset(
        grain.ReadOptions(num_threads=reader_threads(config.read_threads),
                           prefetch_buffer_size=max(2, 2 * config.batch_size)))
    if config.worker_count > 0:
        # Workers encode every n-th sample and Grain interleaves them back in order; skipping and batching after
        # this point keeps batches identical for any worker count.
        elements = elements.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return PaddedBatchIterDataset(elements, config.batch_size, config.buckets(), num_frames, config.frame_size,
                                  config.pad_id, config.drop_remainder, config.preprocessing)
