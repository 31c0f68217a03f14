"""Measurement: what storing training / evaluation frames as JPEG changes against upstream's per-step MP4 decoding.

Upstream decodes each clip from the MP4 at every step (llavaction/action/utils.py: avion_video_loader) and squashes
the frames to 384 px with PIL bicubic (SigLipImageProcessor). ``extract-frames`` decodes once and stores those
384 px frames as JPEG (default, quality 95) or PNG (``--codec png``, lossless). On a real H.264 clip written with
PyAV (912x512, 30 fps, yuv420p, crf 23, a textured moving scene), this compares per codec the model-ready pixels
with upstream's (read_clip: decode + resize + normalise, the path ``predict`` uses) and the next-token logits of a
tiny random model (configs/tiny.py) on both, in the same run; plus bytes per frame.

    python -m llavaction_jax.bench.frame_codec [--num-frames 16] [--no-write]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax import cli_flags
from llavaction_jax.bench.common import record
from llavaction_jax.config import ModelConfig, load_preset
from llavaction_jax.data import extract
from llavaction_jax.data.clip import read_clip
from llavaction_jax.data.frames import decode_frames
from llavaction_jax.data.image import DEFAULT_FRAME_SIZE, normalize_frames
from llavaction_jax.data.video import VideoCache
from llavaction_jax.model import llava

WIDTH, HEIGHT, FPS, SECONDS = 912, 512, 30, 4
CODECS = (("jpeg", 95), ("jpeg", 75), ("png", None))


def write_clip(path: pathlib.Path, seed: int = 0) -> None:
    """A textured scene (smooth shading, fine noise, edges) with a moving, rotating object: what a real kitchen
    video gives the encoder to work on, rather than flat colour."""
    import av  # PyAV: the writer of real MP4s, an optional dependency of the benchmarks

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = (np.stack([xx / WIDTH * 180 + 40, yy / HEIGHT * 140 + 60, (xx + yy) / (WIDTH + HEIGHT) * 200], -1)
                  + rng.normal(0, 12, (HEIGHT, WIDTH, 3)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23"}
        for t in range(FPS * SECONDS):
            frame = background.copy()
            cx, cy, angle = 150 + 4 * t, 256 + 80 * np.sin(t / 15), t / 20
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            board = ((np.abs(u) < 90) & (np.abs(v) < 50))[..., None]
            checks = ((np.floor(u / 12) + np.floor(v / 12)) % 2)[..., None] * 200 + 30
            frame = np.where(board, checks, frame)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8),
                                                                   format="rgb24")))
        container.mux(stream.encode())


def stored_pixels(video: pathlib.Path, start: float, end: float, frames: int, size: int, codec: str,
                  quality: int | None) -> tuple[np.ndarray, int]:
    """(model-ready pixels, bytes per frame) of the clip through extract-frames' path: decode, resize, encode, then
    decode the stored frames and normalise as the pipeline does."""
    settings = {"layout": "whole", "sampling": "ek100", "num_frames": frames, "fps": None, "frame_size": size,
                "codec": codec, "jpeg_quality": quality or 95, "chunk_len": 15}
    clip = extract.ClipSpec("clip", "video", str(video), start, end)
    stored = extract.extract_clip(clip, settings, VideoCache())
    return normalize_frames(decode_frames(stored)), sum(map(len, stored.frames)) // frames


def levels(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute difference in 8-bit levels of two normalised (x / 127.5 - 1) pixel arrays."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) * 127.5
    return float(diff.max()), float(diff.mean())


def next_token_logits(params, cfg: ModelConfig, pixels: jax.Array) -> jax.Array:
    ids = jnp.asarray([[5, 9, llava.IMAGE_TOKEN_INDEX, 17, 23, 42]], jnp.int32)
    out = llava.forward(params, cfg, ids, pixels[None], jnp.ones(ids.shape, bool))
    return llava.lm_logits(params, out.hidden)[0, -1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_flags.add_num_frames(parser, "the clip's (upstream's eval: 16)", default=16)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    cfg = load_preset("tiny").resolved("cpu", 1)
    params = llava.init(cfg, jax.random.key(0))
    step = jax.jit(next_token_logits, static_argnums=1)
    logits = lambda params, cfg, pixels: np.asarray(step(params, cfg, jnp.asarray(pixels)))  # noqa: E731
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        video = pathlib.Path(tmp) / "clip.mp4"
        write_clip(video)
        start, end = 0.4, 3.6
        for size, what in ((DEFAULT_FRAME_SIZE, "pixels at 384 px (LLaVAction's input)"),
                           (cfg.vision.image_size, f"tiny model ({cfg.vision.image_size} px frames)")):
            upstream = read_clip(str(video), start, end, args.num_frames, size).pixels
            reference = logits(params, cfg, upstream) if size == cfg.vision.image_size else None
            for codec, quality in CODECS:
                ours, nbytes = stored_pixels(video, start, end, args.num_frames, size, codec, quality)
                peak, mean = levels(ours, upstream)
                line = (f"- {what}, {codec}{f' q{quality}' if quality else ''}: |pixel - upstream's| max {peak:.1f}, "
                        f"mean {mean:.3f} levels; {nbytes / 1024:.1f} KiB a frame")
                if reference is not None:
                    got = logits(params, cfg, ours)
                    line += (f"; next-token logits max |diff| {np.abs(got - reference).max():.2e} (logit range "
                             f"{np.ptp(reference):.2f}), same argmax: {int(got.argmax()) == int(reference.argmax())}")
                lines.append(line)
    record("Frame storage: JPEG / PNG shards vs upstream's per-step MP4 decoding",
           f"python -m llavaction_jax.bench.frame_codec --num-frames {args.num_frames}",
           [f"- clip: PyAV libx264 yuv420p crf 23, {WIDTH}x{HEIGHT} {FPS} fps, {args.num_frames} frames of 0.4-3.6 s",
            *lines], write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
