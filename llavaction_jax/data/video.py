"""Video decoding for frame extraction: decord, or PyAV, and a per-worker cache of opened videos.

``VideoCache`` holds the decoder policy (``decord``, ``pyav``, or ``auto`` = decord with a PyAV fallback) and
keeps a few videos open so the clips of one video reuse its reader. Both readers return RGB frames
(N, H, W, 3) uint8 for exact frame indices. A *directory* of JPEG / PNG frames (how some benchmarks ship their
videos, e.g. MVBench's TVQA clips) is read as a video of its images in name order at ``FRAME_DIR_FPS``.
"""

from __future__ import annotations

import collections
import os
import sys

import numpy as np
from PIL import Image

# Frame folders carry no rate; lmms-eval's llava_vid reads MVBench's (TVQA, extracted at 3 fps) at 3 fps
# (lmms_eval/models/simple/llava_vid.py: generate_until).
FRAME_DIR_FPS = 3.0
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


class _DecordVideo:
    def __init__(self, path: str):
        import decord  # noqa: PLC0415 (optional dependency, imported where used)

        self._reader = decord.VideoReader(path, num_threads=1)
        self.num_frames, self.avg_fps = len(self._reader), float(self._reader.get_avg_fps())

    def get(self, ids) -> np.ndarray:
        return self._reader.get_batch(list(ids)).asnumpy()


class _PyAVVideo:
    def __init__(self, path: str):
        import av  # noqa: PLC0415 (optional dependency, imported where used)

        self._path = path
        with av.open(path) as container:
            stream = container.streams.video[0]
            self.avg_fps = float(stream.average_rate or stream.guessed_rate)
            self.num_frames = stream.frames or sum(1 for _ in container.decode(video=0))

    def get(self, ids) -> np.ndarray:
        import av  # noqa: PLC0415 (optional dependency, imported where used)

        wanted, found = set(ids), {}
        with av.open(self._path) as container:  # decode from the start: frame numbers stay exact, unlike seeking
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if len(found) == len(wanted):
                    break
        missing = sorted(wanted - found.keys())
        if missing:
            raise IndexError(f"{self._path}: frames {missing} not found, the video decodes to fewer frames")
        return np.stack([found[i] for i in ids])


class _FrameDirVideo:
    """A folder of frame images, in sorted name order (lmms-eval globs them unsorted; the order of a listing is
    the file system's, so sorting is the reproducible reading)."""

    def __init__(self, path: str):
        self._files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(FRAME_SUFFIXES))
        if not self._files:
            raise ValueError(f"{path}: a folder without {'/'.join(FRAME_SUFFIXES)} frames")
        self.num_frames, self.avg_fps = len(self._files), FRAME_DIR_FPS

    def get(self, ids) -> np.ndarray:
        frames = []
        for i in ids:
            with Image.open(self._files[i]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)


class VideoCache:
    """Opened videos of one worker (a few, reused across the clips of a video), with the decoder policy:
    ``decord``, ``pyav``, or ``auto`` = decord, falling back to PyAV when decord cannot open or read a file.
    A file that failed to open fails again immediately instead of being retried for each of its clips."""

    def __init__(self, decoder: str = "auto", capacity: int = 8):
        self.decoder, self.capacity = decoder, capacity
        self._open: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.fps_mismatches: dict[str, float] = {}  # video path -> its own rate, where it disagrees with --fps

    def frame_rate(self, path: str, expected: float | None = None) -> float:
        """The video's own frame rate (container metadata). One that disagrees with `expected` (a user's --fps)
        is warned about once per video and kept in `fps_mismatches`; the video's own rate is still returned."""
        rate = float(self.open(path).avg_fps)
        if expected and abs(rate - expected) > 1e-4 * expected and path not in self.fps_mismatches:
            self.fps_mismatches[path] = rate
            print(f"[extract-frames] warning: {path} runs at {rate:g} fps, not --fps {expected:g}; its frame numbers "
                  f"use {rate:g}", file=sys.stderr, flush=True)
        return rate

    def open(self, path: str):
        if path not in self._open:
            if len(self._open) >= self.capacity:
                self._open.popitem(last=False)
            self._open[path] = self._try_open(path)
        self._open.move_to_end(path)
        if isinstance(self._open[path], Exception):
            raise self._open[path]
        return self._open[path]

    def _try_open(self, path: str):
        if os.path.isdir(path):
            try:
                return _FrameDirVideo(path)
            except (OSError, ValueError) as error:
                return error
        if not os.path.isfile(path):
            return FileNotFoundError(f"video file {path} does not exist")
        errors = []
        for name, cls in (("decord", _DecordVideo), ("pyav", _PyAVVideo)):
            if self.decoder in (name, "auto"):
                try:
                    return cls(path)
                except Exception as error:  # decoders raise their own types; the message goes to failures.jsonl
                    errors.append(f"{name}: {type(error).__name__}: {error}")
        return RuntimeError(f"cannot open video {path} ({'; '.join(errors)})")

    def read(self, path: str, ids) -> np.ndarray:
        video = self.open(path)
        if max(ids) >= video.num_frames or min(ids) < 0:
            raise IndexError(f"{path}: frame ids {min(ids)}..{max(ids)} outside its {video.num_frames} frames")
        try:
            return video.get(ids)
        except Exception:
            if self.decoder != "auto" or isinstance(video, (_PyAVVideo, _FrameDirVideo)):
                raise
            self._open[path] = _PyAVVideo(path)  # decord opened it but could not decode these frames
            return self._open[path].get(ids)
