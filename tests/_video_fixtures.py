"""Tiny MP4s with known frame content, written with PyAV (libx264, lossless, 4:4:4)."""

import av
import numpy as np


def known_frames(first: int, count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame k (global number) is a flat red level 5*k mod 250 with a blue bar whose width encodes k // 50, and a
    green gradient, so frames differ from each other and resizing has structure to work on."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        k = first + i
        frames[i, ..., 0] = (5 * k) % 250
        frames[i, ..., 1] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
        frames[i, :, : 4 + 4 * (k // 50), 2] = 255
    return frames


def write_mp4(path, frames: np.ndarray, fps: int = 30) -> None:
    """qp 0 + yuv444p is lossless in YUV; the RGB->YUV->RGB round trip still moves values by up to ~3 levels, so
    tests compare against frames decoded from the file, never against ``frames`` exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def decode_all_pyav(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
