"""One video file (or a time span of it) -> the model's frames, the way upstream's inference reads a clip.

Upstream answers about a clip by decoding ``num_frames`` frames at the midpoints of equal segments of
``[round(start * fps), round(end * fps)]`` (llavaction/action/utils.py: avion_video_loader, get_frame_ids), each
preprocessed by the vision tower's image processor (SigLIP's: squashed to its size with PIL bicubic and normalised to [-1, 1],
llavaction/model/multimodal_encoder/siglip_encoder.py: SigLipImageProcessor.preprocess), and states the requested
duration ``end - start`` in the time instruction. `extract-frames` stores exactly these frames in shards for `eval`;
`predict` and `LlavaModel.generate` read them straight from the file through the same functions (data/sampling.py,
data/video.py, data/image.py), so a clip gets the same pixels either way (for PNG shards; JPEG ones are lossy).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llavaction_jax.data import sampling
from llavaction_jax.data.image import DEFAULT_FRAME_SIZE, DEFAULT_PREPROCESSING, preprocess_frames
from llavaction_jax.data.video import VideoCache
from llavaction_jax.vision_towers import Preprocessing


@dataclasses.dataclass(frozen=True)
class Clip:
    pixels: np.ndarray  # float32 (T, 3, S, S), upstream's pixel_values
    duration: float  # seconds the time instruction reports (end - start as requested)
    frame_ids: tuple[int, ...]  # absolute frame numbers in the file
    fps: float  # the file's own frame rate
    note: str | None = None  # what the reader changed about the request (an end past the video's end)


def read_clip(path: str, start: float | None = None, end: float | None = None, num_frames: int = 16,
              image_size: int = DEFAULT_FRAME_SIZE, videos: VideoCache | None = None,
              preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> Clip:
    """Frames ``start``..``end`` seconds of ``path`` (default: the whole video) for a model of ``image_size`` whose
    vision tower takes ``preprocessing`` (vision_towers.py).

    ``videos`` (a data/video.VideoCache) chooses the decoder (decord, falling back to PyAV) and keeps files open
    across calls; errors name the file."""
    videos = videos or VideoCache()
    try:
        video = videos.open(path)
    except (FileNotFoundError, RuntimeError) as error:  # VideoCache's errors already name the file
        raise ValueError(str(error)) from None
    fps = float(video.avg_fps)
    start = 0.0 if start is None else float(start)
    length = video.num_frames / fps
    note = None
    if end is not None and float(end) > length:  # sampled up to the last frame, as upstream's loader does
        note = (f"end {float(end):g} s is past the end of {path} ({length:.3f} s): frames were sampled up to its "
                "last frame (the time instruction states the requested duration, as upstream)")
    end = length if end is None else float(end)
    if start < 0 or end <= start:
        raise ValueError(f"{path}: the clip must satisfy 0 <= start < end, got start={start} end={end}")
    try:
        ids = sampling.whole_video_frame_ids(start, end, fps, num_frames, video.num_frames)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    ids = [int(i) for i in ids]
    try:
        frames = videos.read(path, ids)
    except Exception as error:  # the decoders raise their own types; name the file and the frames
        raise ValueError(f"{path}: cannot decode frames {ids[0]}..{ids[-1]} ({type(error).__name__}: {error})") from None
    return Clip(preprocess_frames(frames, image_size, preprocessing), end - start, tuple(ids), fps, note)
