"""Which frames of a video a clip uses: upstream's two sampling rules and the chunked-video index mapping.

* EK100 (``avion_video_loader`` / ``get_frame_ids``, llavaction/action/utils.py): the midpoints of ``num_frames`` equal
  segments of ``[round(start*fps), round(end*fps)]``, truncated to int.
* AVION-style chunked videos: ``{root}/{pid}/{vid}.MP4/{chunk_start}.MP4`` files of ``chunk_len`` = 15 s; the
  absolute frame ids are split over the chunks they fall in, relative to each chunk's first frame.
* LLaVA-Video (``process_video_with_decord``, llavaction/utils.py): about ``video_fps`` frames per second; more
  than ``frames_upbound`` frames (or ``force_sample``) switches to ``np.linspace`` over the range.

Pure functions of numbers; opening files is the caller's job (``chunk_frame_count`` below is a callback).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

CHUNK_SECONDS = 15  # AVION chunk length used by every upstream EK100 loader


def segment_midpoint_frame_ids(
    start_frame: int, end_frame: int, num_segments: int, jitter: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Upstream ``get_frame_ids``: midpoints of ``num_segments`` equal parts of [start_frame, end_frame].

    With ``jitter`` each id moves by ``(U[0,1) - 0.5) * (end - start - 1) / num_segments`` (train-time option,
    off in every shipped setting). Returns int64 ids, truncated toward zero like upstream's ``astype(int)``.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    # np.convolve with [0.5, 0.5] (not (a + b) / 2) so float rounding matches upstream's expression exactly.
    ids = np.convolve(np.linspace(start_frame, end_frame, num_segments + 1), [0.5, 0.5], mode="valid")
    if jitter:
        rng = np.random.default_rng() if rng is None else rng
        segment = float(end_frame - start_frame - 1) / num_segments
        ids = ids + (rng.random(num_segments) - 0.5) * segment
    return ids.astype(np.int64)


def ek100_frame_ids(
    start_sec: float, end_sec: float, fps: float, num_frames: int, jitter: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Absolute frame ids of a clip: ``segment_midpoint_frame_ids(round(start*fps), round(end*fps), num_frames)``.

    Python's ``round`` (half to even), as upstream. Spec example: 3.00-4.00 s, 30 fps, 16 -> [90, 92, ..., 119].
    """
    start_frame, end_frame = int(round(start_sec * fps)), int(round(end_sec * fps))
    if end_frame < start_frame:
        raise ValueError(
            f"clip ends before it starts: {start_sec} s -> frame {start_frame}, {end_sec} s -> frame {end_frame}")
    return segment_midpoint_frame_ids(start_frame, end_frame, num_frames, jitter, rng)


def whole_video_frame_ids(
    start_sec: float, end_sec: float, fps: float, num_frames: int, video_num_frames: int, jitter: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """EK100 rule on one uncut video: the end is clamped to the last frame's time, as the chunked loader does."""
    if video_num_frames < 1:
        raise ValueError("the video has no frames")
    end_sec = min(end_sec, (video_num_frames - 1) / fps)
    if start_sec > end_sec:
        raise ValueError(f"clip starts at {start_sec} s, after the video's last frame at {end_sec:.3f} s")
    return ek100_frame_ids(start_sec, end_sec, fps, num_frames, jitter, rng)


@dataclasses.dataclass(frozen=True)
class ChunkRead:
    """Frames to read from one chunk file: ``{vid}.MP4/{chunk_start}.MP4``, ids relative to that file."""

    chunk_start: int  # seconds; also the chunk file's stem
    frame_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ChunkedClip:
    frame_ids: tuple[int, ...]  # absolute ids in the uncut video (what the shard records)
    reads: tuple[ChunkRead, ...]  # in order; concatenating their frames gives the clip
    end_sec: float  # end after clamping to the last available frame


def chunked_clip(
    start_sec: float, end_sec: float, fps: float, num_frames: int, chunk_frame_count: Callable[[int], int | None],
    chunk_len: int = CHUNK_SECONDS, jitter: bool = False, rng: np.random.Generator | None = None,
) -> ChunkedClip:
    """Upstream ``avion_video_loader``'s index arithmetic (llavaction/action/utils.py: avion_video_loader, chunk
    bounds, end clamp, frame ids, per-chunk relative ids).

    ``chunk_frame_count(chunk_start)`` returns the number of frames of chunk file ``{chunk_start}.MP4``, or None
    when that file does not exist. The last chunk is the one holding ``end_sec``, stepped back while missing (the
    final chunk of a video can end early); the end is clamped to that chunk's last frame.
    """
    chunk_start = int(start_sec) // chunk_len * chunk_len
    chunk_end = int(end_sec) // chunk_len * chunk_len
    while (last_count := chunk_frame_count(chunk_end)) is None:
        chunk_end -= chunk_len
        if chunk_end < chunk_start:
            raise FileNotFoundError(f"no chunk file from {chunk_start} s to {int(end_sec) // chunk_len * chunk_len} s")
    end_sec = min(end_sec, (last_count - 1) / fps + chunk_end)
    if start_sec > end_sec:
        raise ValueError(f"clip starts at {start_sec} s, after the last frame at {end_sec:.3f} s")
    frame_ids = ek100_frame_ids(start_sec, end_sec, fps, num_frames, jitter, rng).tolist()

    reads = []
    for chunk in range(chunk_start, chunk_end + chunk_len, chunk_len):
        lo, hi = int(chunk * fps), int((chunk + chunk_len) * fps)
        relative = tuple(int(i - chunk * fps) for i in frame_ids if lo <= i < hi)
        if relative:
            reads.append(ChunkRead(chunk, relative))
    if sum(len(r.frame_ids) for r in reads) != num_frames:  # upstream asserts this too; ids before chunk_start
        raise ValueError(f"frame ids {frame_ids} do not all fall in chunks {chunk_start}..{chunk_end} s")
    return ChunkedClip(tuple(frame_ids), tuple(reads), end_sec)


def llava_video_frame_ids(
    start_frame: int, end_frame: int, avg_fps: float, frames_upbound: int = 64, force_sample: bool = False,
    video_fps: float = 1.0,
) -> np.ndarray:
    """Upstream LLaVA-Video sampling over frames [start_frame, end_frame) (the whole video: 0, len(video)).

    Every ``round(avg_fps / video_fps)``-th frame (about ``video_fps`` per second); if that gives more than
    ``frames_upbound`` frames, or ``force_sample``, exactly ``frames_upbound`` frames from
    ``np.linspace(start, end - 1, frames_upbound, dtype=int)``. ``frames_upbound <= 0`` means no cap.
    """
    if end_frame <= start_frame:
        raise ValueError(f"empty frame range [{start_frame}, {end_frame})")
    # Upstream's step is round(avg_fps / video_fps), which is 0 (a crash) below 0.5 frames per sample; use 1 there.
    step = max(1, int(round(avg_fps / video_fps)))
    ids = np.arange(start_frame, end_frame, step, dtype=np.int64)
    if frames_upbound > 0 and (len(ids) > frames_upbound or force_sample):
        ids = np.linspace(start_frame, end_frame - 1, frames_upbound, dtype=int).astype(np.int64)
    return ids
