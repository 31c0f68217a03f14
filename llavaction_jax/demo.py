"""`python -m llavaction_jax demo`: the whole inference path on an embedded default, no downloads.

Writes a synthetic egocentric clip as a real MP4 (PyAV), samples frames with upstream's EK100 midpoint rule,
preprocesses them the upstream way (PIL bicubic squash, x/255, (x-0.5)/0.5), builds the EK100-MQA prompt byte for
byte, tokenizes it with the Qwen2 tokenizer, and answers with a tiny *random* LLaVAction (configs/tiny.py) using
batched KV-cache generation. The answer is noise (the model is untrained); the point is the plumbing and the
timings. Issue 7 replaces this with a demo that trains the model to answer correctly.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="directory for the demo clip (default: a temporary directory)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled from the clip (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="generation budget (default 12)")
    parser.add_argument("--seed", type=int, default=0)


def write_synthetic_clip(path: pathlib.Path, seconds: float = 2.0, fps: int = 30, size: int = 128) -> None:
    """A red square sliding left to right over a grey counter: 'move' is visible in the motion."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        n = int(seconds * fps)
        for i in range(n):
            frame = np.full((size, size, 3), 90, np.uint8)
            x = int((size - 32) * i / max(n - 1, 1))
            frame[48:80, x : x + 32] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_frames(path: pathlib.Path, indices: np.ndarray) -> np.ndarray:
    import av

    wanted = set(int(i) for i in indices)
    frames = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
    return np.stack([frames[int(i)] for i in indices])


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from llavaction_jax.api import LlavaModel
    from llavaction_jax.config import load_preset
    from llavaction_jax.data import chat, prompts, sampling
    from llavaction_jax.data.image import preprocess_frames
    from llavaction_jax.data.tokenizer import load_qwen_tokenizer
    from llavaction_jax.eval.generate import GenerationConfig, generate
    from llavaction_jax.eval.parsing import parse_answer

    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> float:
        timings[name] = time.perf_counter() - t0
        return time.perf_counter()

    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="llavaction_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "clip.mp4"
    t = time.perf_counter()
    write_synthetic_clip(clip)
    t = stage("write mp4 (PyAV)", t)
    indices = sampling.whole_video_frame_ids(0.0, 2.0, 30, args.frames, video_num_frames=60)  # EK100 midpoint rule
    frames = decode_frames(clip, np.asarray(indices))
    cfg = load_preset("tiny")
    pixels = preprocess_frames(frames, cfg.vision.image_size)
    t = stage("decode + preprocess frames", t)
    tokenizer = load_qwen_tokenizer()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer)))

    options = prompts.letter_options(["move red block", "open drawer", "cut onion", "wash plate", "take cup"])
    user = prompts.user_message(prompts.mc_prompt(options), duration=2.0, n_frames=args.frames,
                                include_time_instruction=True)
    prompt = chat.build_inference_prompt(user)
    ids = np.asarray(chat.tokenizer_image_token(prompt, tokenizer))[None]
    model = LlavaModel.random(cfg, seed=args.seed)
    t = stage("tokenize + init tiny model", t)

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, vocab_limit=len(tokenizer))
    inputs = (jnp.asarray(ids), jnp.asarray(pixels)[None], jnp.ones(ids.shape, bool))
    tokens, n = generate(model.params, cfg, gen, *inputs)
    jax.block_until_ready(tokens)
    t = stage("generate (incl. compile)", t)
    tokens, n = generate(model.params, cfg, gen, *inputs)
    jax.block_until_ready(tokens)
    stage("generate (compiled)", t)

    raw = tokenizer.decode(np.asarray(tokens[0, : int(n[0])]), skip_special_tokens=True)
    print(f"clip: {clip} ({len(indices)} frames at {[int(i) for i in indices]})")
    print(f"prompt ({ids.shape[1]} tokens + {cfg.tokens_per_video(args.frames)} visual):\n{user}")
    print(f"answer of the untrained tiny model: {parse_answer(raw)!r}")
    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds * 1e3:8.1f} ms")
    return 0
