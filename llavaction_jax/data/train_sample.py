"""One training sample -> model-ready arrays: its clip's frames from the shards, its tokens and labels.

The join between a sample and the frame shards (``clip_uid``), first rule that applies:

1. ``sample["uid"]``: explicit;
2. ``sample["narration_id"]``: EK100 samples from ``build-train`` show the annotated segment, which
   ``extract-frames --ek100-csv`` stores under its narration id; except ``temporal_detection`` samples, whose clip
   is a padded window around the segment, so they fall through to rule 3;
3. ``f"{video}_{start:.2f}_{end:.2f}"`` from ``start``/``end`` (or upstream's ``start_timestamp``/
   ``end_timestamp``): the default uid ``extract-frames --jsonl`` gives a clip with times;
4. ``video``: a whole video (``extract-frames --jsonl`` without times).

A sample without ``video`` (and without ``uid``) is text-only: ``has_video`` False, no ``<image>`` placeholder,
zero pixels. When the sample gives times, the stored clip must cover the same window (to 0.01 s), which catches a
sample joined to the wrong clip.

Text follows upstream's ``_get_item`` (llavaction/train/train.py: LazySupervisedDataset._get_item): a sample of a
dataset that stores questions gets its prompt built from the loaded clip by that dataset's ``QuestionPrompts`` (EK100:
``ek100.train_prompt.EK100PromptSettings``, passed in by the caller so this generic room knows no dataset); other
videos get LLaVA-Video's time instruction (``add_time_instruction``, on by default as upstream); then
``preprocess_multimodal`` moves a lone ``<image>`` to the front, then ``preprocess_qwen`` gives ids and labels,
truncated to ``max_length``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import grain
import numpy as np

from llavaction_jax.data import chat
from llavaction_jax.data.frames import ClipRecord, FrameShards, ShardSet, decode_frames
from llavaction_jax.data.image import DEFAULT_FRAME_SIZE, DEFAULT_PREPROCESSING, resize_frames
from llavaction_jax.data.mixture import SOURCE_KEY
from llavaction_jax.data.tokenizer import load_qwen_tokenizer
from llavaction_jax.vision_towers import Preprocessing

NO_ACTIONS = (-1, -1, -1)  # upstream's actions for samples without verb/noun/action ids
ON_BAD_SAMPLE = ("error", "skip")
WINDOW_TOLERANCE_SEC = 0.011  # uids round times to 2 decimals
EPOCH_KEY = "_epoch"  # the epoch a sample is read in, set by the pipeline (TagEpoch)


class QuestionPrompts(Protocol):
    """A dataset whose samples store a question that becomes the user prompt once the clip is loaded."""

    def owns(self, sample: Mapping) -> bool:
        """The sample is this dataset's (it gets no LLaVA-Video time instruction)."""

    def user_prompt(self, sample: Mapping, n_frames: int, include_time_instruction: bool, epoch: int) -> str | None:
        """The first user turn for a clip of ``n_frames`` loaded frames, or None when the stored turn is already the
        prompt; ValueError (naming the problem) for a sample that cannot be prompted."""


class SampleError(ValueError):
    """A sample that cannot be turned into training arrays; the message names the sample and its file."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a sample dropped under the ``skip`` policy; the batcher counts and logs it."""

    sample: str  # sample id and source, as in error messages
    reason: str


def _times(sample: dict) -> tuple[float, float] | None:
    for start_key, end_key in (("start", "end"), ("start_timestamp", "end_timestamp")):
        if sample.get(start_key) is not None and sample.get(end_key) is not None:
            return float(sample[start_key]), float(sample[end_key])
    return None


def clip_uid(sample: dict) -> str | None:
    """The frame-shard uid of the sample's clip (rules in the module docstring), or None for a text-only sample."""
    if sample.get("uid") is not None:
        return str(sample["uid"])
    if sample.get("narration_id") is not None and sample.get("question_type") != "temporal_detection":
        return str(sample["narration_id"])
    video = sample.get("video")
    if video is None:
        return None
    times = _times(sample)
    return str(video) if times is None else f"{video}_{times[0]:.2f}_{times[1]:.2f}"


def describe(sample: dict) -> str:
    """``sample 'P01_01_3-mc' (train.jsonl:7)``: how errors and skip logs name a sample."""
    name = sample.get("id", sample.get("uid", "?"))
    source = sample.get(SOURCE_KEY)
    return f"sample {name!r}" + (f" ({source})" if source else "")


def sample_actions(sample: dict) -> np.ndarray:
    """int32 (3,) verb, noun, action ids; -1 for all three unless the sample has all three (upstream)."""
    ids = [sample.get(k) for k in ("verb_id", "noun_id", "action_id")]
    return np.asarray(NO_ACTIONS if any(i is None for i in ids) else ids, np.int32)


_TOKENIZER_LOCK = threading.Lock()


def cached_tokenizer(path: str | None = None):
    """One tokenizer per process and path (``None``: the bundled Qwen2 tokenizer); thread-safe, because
    transformers' lazy imports break when raced."""
    with _TOKENIZER_LOCK:
        return _load_tokenizer(path)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str | None):
    return load_qwen_tokenizer(path)


@dataclasses.dataclass(frozen=True)
class EncodeTrainSample(grain.transforms.Map):
    """Sample dict -> {input_ids, labels (int32 (L,)), frames (uint8 (T, S, S, 3)), actions (int32 (3,)),
    has_video, sample_id}; text-only samples carry no frames (the batcher fills zeros).

    Frames stay uint8 here: the batcher normalizes them straight into the float32 batch (``normalize_frames`` with
    ``out``), so worker processes move a quarter of the bytes and no per-sample float array is made and copied.

    With ``on_bad_sample="skip"`` a bad sample becomes a ``Skipped`` marker instead of raising. Module level and
    frozen so Grain can pickle it into worker processes.
    """

    shards: FrameShards | ShardSet | None
    tokenizer: Any  # a Qwen2 tokenizer (``cached_tokenizer``); pickled into workers, faster than loading it there
    num_frames: int
    frame_size: int = DEFAULT_FRAME_SIZE
    max_length: int | None = None
    add_time_instruction: bool = True
    on_bad_sample: str = "error"
    question_prompts: QuestionPrompts | None = None  # e.g. ek100.train_prompt.EK100PromptSettings()
    preprocessing: Preprocessing = DEFAULT_PREPROCESSING  # the vision tower's (its resize filter)

    def __post_init__(self):
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")

    def map(self, sample: dict) -> dict | Skipped:
        try:
            return self.encode(sample)
        except SampleError as error:
            if self.on_bad_sample == "error":
                raise
            return Skipped(describe(sample), str(error))

    def encode(self, sample: dict) -> dict:
        """Like ``map`` but always raises ``SampleError`` on a bad sample."""
        where = describe(sample)
        uid = clip_uid(sample)
        element = {"sample_id": str(sample.get("id", uid)), "actions": sample_actions(sample),
                   "has_video": np.bool_(uid is not None)}
        conversations = sample["conversations"]
        if uid is not None:
            record = self._read_clip(uid, sample, where)
            element["frames"] = self._frames(record, where)
            owner = self.question_prompts if self.question_prompts and self.question_prompts.owns(sample) else None
            if owner is not None:
                try:
                    user = owner.user_prompt(sample, record.num_frames, self.add_time_instruction,
                                             sample.get(EPOCH_KEY, 0))
                except ValueError as error:
                    raise SampleError(f"{where}: {error}") from None
                if user is not None:
                    key = "value" if "value" in conversations[0] else "content"
                    conversations = [{**conversations[0], key: user}, *conversations[1:]]
            elif self.add_time_instruction:
                conversations = _with_time_instruction(conversations, record)
        try:
            tokens = chat.preprocess_qwen(chat.move_placeholder_to_front(conversations), self.tokenizer,
                                          has_image=uid is not None, max_len=self.max_length,
                                          sample_id=sample.get("id"))
        except ValueError as error:
            raise SampleError(f"{where}: {error}") from None
        element["input_ids"], element["labels"] = tokens.input_ids, tokens.labels
        return element

    def _read_clip(self, uid: str, sample: dict, where: str) -> ClipRecord:
        if self.shards is None:
            raise SampleError(f"{where}: has a video (clip {uid!r}) but the pipeline was given no frame shards")
        try:
            record = self.shards.lookup(uid)
        except (KeyError, ValueError, OSError) as error:  # missing uid, damaged record
            raise SampleError(f"{where}: {error.args[0] if error.args else error}") from None
        if record.num_frames > self.num_frames:  # fewer is fine: the batch pads it and keeps its count
            raise SampleError(f"{where}: clip {uid!r} has {record.num_frames} frames, more than the pipeline's "
                              f"{self.num_frames} (data.num_frames; {self.shards.directory})")
        times = _times(sample)
        if times is not None and (abs(record.start_sec - times[0]) > WINDOW_TOLERANCE_SEC
                                  or abs(record.end_sec - times[1]) > WINDOW_TOLERANCE_SEC):
            raise SampleError(f"{where}: clip {uid!r} covers {record.start_sec}-{record.end_sec} s, the sample "
                              f"asks for {times[0]}-{times[1]} s")
        return record

    def _frames(self, record: ClipRecord, where: str) -> np.ndarray:
        try:
            frames = decode_frames(record)
        except ValueError as error:
            raise SampleError(f"{where}: {error} ({self.shards.directory})") from None
        if frames.shape[1:3] != (self.frame_size, self.frame_size):
            # shards stored at source size: squash like upstream
            frames = resize_frames(frames, self.frame_size, self.preprocessing)
        return frames


def _with_time_instruction(conversations: list, record: ClipRecord) -> list:
    """LLaVA-Video's time instruction on the first message (upstream applies it to the first turn as is)."""
    first = dict(conversations[0])
    key = "value" if "value" in first else "content"
    first[key] = chat.llava_video_time_prompt(first[key], record.duration_sec, record.num_frames)
    return [first, *conversations[1:]]


@dataclasses.dataclass(frozen=True)
class TagEpoch(grain.transforms.MapWithIndex):
    """Adds ``EPOCH_KEY`` to a sample of this process's slice: element ``index`` is global element
    ``index * process_count + process_index`` of epochs of ``per_epoch`` elements (pipeline._this_process_slice)."""

    per_epoch: int
    process_index: int = 0
    process_count: int = 1

    def map_with_index(self, index: int, sample: dict) -> dict:
        return {**sample, EPOCH_KEY: (index * self.process_count + self.process_index) // self.per_epoch}
