"""Encoded samples -> padded batches -> global jax Arrays.

Sequences are right-padded (upstream's tokenizer side) to the smallest length bucket that holds the batch's longest
sample, so a jitted step compiles once per bucket instead of once per length. Skipped samples (``Skipped``
markers from ``EncodeTrainSample``) are dropped here, in the main process, so the count and the log lines are the
same for any number of worker processes and the count is part of the iterator state.

Batch dict (B = per-process batch size, Lb = the bucket, T = the pipeline's frame count, frames of S x S):

    input_ids       int32   (B, Lb)  one -200 placeholder per video sample; padding = pad id (<|endoftext|>)
    attention_mask  bool    (B, Lb)  False on padding
    labels          int32   (B, Lb)  -100 where no loss (masked tokens, padding)
    pixel_values    float32 (B, T, 3, S, S) in [-1, 1]; a clip of fewer frames fills the first ones, zeros after
                             (upstream trains a short clip at its own length: the model keeps its frames only);
                             zeros for text-only samples
    num_frames      int32   (B,)     frames of each sample's clip (0 for text-only samples)
    actions         int32   (B, 3)   verb, noun, action ids; -1 when absent
    has_video       bool    (B,)
    sample_id       str     (B,)     the samples' ids (logging / debugging; not sent to devices)
    num_skipped     int64   ()       samples this iterator has skipped so far (``skip`` policy)
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from llavaction_jax.data.chat import IGNORE_INDEX
from llavaction_jax.data.image import DEFAULT_PREPROCESSING, normalize_frames
from llavaction_jax.vision_towers import Preprocessing
from llavaction_jax.data.train_sample import Skipped

logger = logging.getLogger(__name__)

QWEN_PAD_ID = 151643  # <|endoftext|>, Qwen2's pad token (llavaction/train/train.py: DataCollatorForSupervisedDataset)
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "actions", "has_video", "num_frames")
_TEXT_PAD = {"input_ids": None, "attention_mask": False, "labels": IGNORE_INDEX}  # None: the pad id


def power_of_two_buckets(max_length: int, min_length: int = 64) -> tuple[int, ...]:
    """(64, 128, ..., max_length): powers of two below ``max_length``, then ``max_length`` itself."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"lengths must be >= 1, got max_length={max_length} min_length={min_length}")
    buckets, length = [], min_length
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``length``."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"a sequence of {length} tokens is longer than the largest length bucket {buckets[-1]}")


def collate(elements: list[dict], buckets: tuple[int, ...], num_frames: int, frame_size: int,
            pad_id: int = QWEN_PAD_ID, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> dict:
    """Stack encoded samples into one batch padded to its bucket (schema in the module docstring); frames are
    normalized here (the vision tower's `preprocessing`), written straight into the batch."""
    length = bucket_length(max(len(e["input_ids"]) for e in elements), buckets)
    b = len(elements)
    input_ids = np.full((b, length), pad_id, np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    attention_mask = np.zeros((b, length), bool)
    pixel_values = np.empty((b, num_frames, 3, frame_size, frame_size), np.float32)
    frame_counts = np.zeros((b,), np.int32)
    for i, element in enumerate(elements):
        n = len(element["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = element["input_ids"], element["labels"], True
        t = len(element["frames"]) if "frames" in element else 0
        if t > num_frames:
            raise ValueError(f"sample {element['sample_id']!r} has {t} frames, more than the batch's {num_frames}")
        if t:
            normalize_frames(element["frames"], out=pixel_values[i, :t], preprocessing=preprocessing)  # into the batch
        pixel_values[i, t:] = 0
        frame_counts[i] = t
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values,
        "actions": np.stack([e["actions"] for e in elements]).astype(np.int32),
        "has_video": np.asarray([bool(e["has_video"]) for e in elements]),
        "num_frames": frame_counts,
        "sample_id": np.asarray([e["sample_id"] for e in elements]),
    }


class PaddedBatchIterDataset(grain.IterDataset):
    """Batches of ``batch_size`` encoded samples padded to length buckets; drops and counts ``Skipped`` markers."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: tuple[int, ...], num_frames: int,
                 frame_size: int, pad_id: int = QWEN_PAD_ID, drop_remainder: bool = True,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING):
        super().__init__(parent)
        self.batch_size, self.buckets, self.pad_id, self.drop_remainder = batch_size, tuple(buckets), pad_id, \
            drop_remainder
        self.num_frames, self.frame_size, self.preprocessing = num_frames, frame_size, preprocessing

    def __iter__(self) -> grain.DatasetIterator:
        return _PaddedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PaddedBatchIterDataset(batch_size={self.batch_size}, buckets={self.buckets})"


class _PaddedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: PaddedBatchIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._num_skipped = 0

    def __next__(self) -> dict:
        spec, elements = self._spec, []
        while len(elements) < spec.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if isinstance(element, Skipped):
                self._num_skipped += 1
                logger.warning("skipped %s: %s (%d skipped so far)", element.sample, element.reason,
                               self._num_skipped)
                continue
            elements.append(element)
        if not elements or (spec.drop_remainder and len(elements) < spec.batch_size):
            raise StopIteration
        batch = collate(elements, spec.buckets, spec.num_frames, spec.frame_size, spec.pad_id, spec.preprocessing)
        batch["num_skipped"] = np.int64(self._num_skipped)
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "num_skipped": self._num_skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._num_skipped = int(state["num_skipped"])


def make_global_batch(batch: dict, mesh, pad_id: int = QWEN_PAD_ID) -> dict:
    """Per-process numpy batches -> global jax Arrays with the batch axis over the mesh's ("data", "fsdp") axes.

    Every process calls this with its own batch (same batch size). Processes may have padded to different length
    buckets; the text arrays are padded here to the longest (one small all-gather) so the global arrays agree.
    The batch axes must be the ones that span processes (each process contributes the rows its devices hold).
    Returns the ``MODEL_KEYS`` arrays; ``sample_id`` and ``num_skipped`` stay on the host.
    """
    # jax only here: Grain's worker processes import this module and need no jax.
    import jax  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from llavaction_jax.sharding import shard_batch  # noqa: PLC0415

    if jax.process_count() > 1:
        lengths = multihost_utils.process_allgather(np.int32(batch["input_ids"].shape[1]))
        batch = pad_text_to(batch, int(np.max(lengths)), pad_id)
    return shard_batch({key: np.asarray(batch[key]) for key in MODEL_KEYS}, mesh)


def pad_text_to(batch: dict, length: int, pad_id: int = QWEN_PAD_ID) -> dict:
    """Right-pad input_ids / attention_mask / labels of a batch to ``length`` (no-op when already that long)."""
    out = dict(batch)
    for key, value in _TEXT_PAD.items():
        array = batch[key]
        extra = length - array.shape[1]
        if extra < 0:
            raise ValueError(f"{key} is {array.shape[1]} long, cannot pad it to {length}")
        if extra:
            fill = pad_id if value is None else value
            out[key] = np.concatenate([array, np.full((array.shape[0], extra), fill, array.dtype)], axis=1)
    return out
