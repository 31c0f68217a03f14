"""Tiny training data for loop tests: a ChatML BPE tokenizer, 2-frame 64 px clips in frame shards, samples JSONL."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

from _watchdog import FAST_COMPILE_FLAG, thread_pool_env
from llavaction_jax.data import frames as fs
from llavaction_jax.data.tokenizer import train_chatml_tokenizer
from llavaction_jax.recipes import load_recipe

VERBS = ["take", "put", "open", "close"]
NOUNS = ["cup", "knife", "plate", "door"]


def make_training_data(root: pathlib.Path, n_clips: int = 16, frames: int = 2, size: int = 64) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    (root / "shards").mkdir(exist_ok=True)
    writer = fs.ShardWriter(root / "shards" / "clips.array_record")
    for i in range(n_clips):
        verb, noun = i % 4, (i // 4) % 4
        pixels = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        writer.write(fs.ClipRecord(f"c{i}", "P01-P01_01", float(i), i + 1.0, 30.0, tuple(range(frames)),
                                   fs.encode_frames(pixels, "png"), "png", 1.0))
        samples.append({"id": f"s{i}", "uid": f"c{i}", "video": "P01-P01_01", "dataset_name": "EK100",
                        "verb_id": verb, "noun_id": noun, "action_id": 4 * verb + noun,
                        "conversations": [
                            {"from": "human", "value": "<image>\nWhat action are you doing? A. take cup, B. open door"},
                            {"from": "gpt", "value": f"{'AB'[i % 2]}. {VERBS[verb]} {NOUNS[noun]}"}]})
    fs.write_manifest(root / "shards", [writer.commit()], {}, frames_per_clip=frames)
    (root / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    texts = [json.dumps(s) for s in samples] + ["You are a helpful assistant. system user assistant"]
    train_chatml_tokenizer(texts * 4, vocab_size=300, out_dir=root / "tokenizer")
    return root


def tiny_train_config(data_root: pathlib.Path, out_dir: pathlib.Path, steps: int, **overrides):
    return load_recipe("train", tiny_train_args(data_root, out_dir, steps, **overrides))


def tiny_train_args(data_root: pathlib.Path, out_dir: pathlib.Path, steps: int, **overrides) -> list[str]:
    """The --config overrides of `tiny_train_config` (for `train` on the command line)."""
    args = [
        f"--config.data.samples={data_root / 'samples.jsonl'}", f"--config.data.shards={data_root / 'shards'}",
        f"--config.data.tokenizer={data_root / 'tokenizer'}", "--config.data.pad_id=0",
        "--config.data.max_length=128", "--config.data.length_buckets=(128,)",
        f"--config.train.output_dir={out_dir}", f"--config.train.steps={steps}", "--config.train.batch_size=8",
        "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3", "--config.train.async_checkpoint=false",
        "--config.optim.learning_rate=1e-3", "--config.optim.vision_lr=1e-4", "--config.optim.warmup_ratio=0.0",
    ]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def train_command(cfg) -> list[str]:
    """`python -m llavaction_jax train` with every field of `cfg` as a --config.x=y override."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif v is not None:  # None is a field's "unset" (config_flags parses no None)
                yield f"{prefix}{k}", repr(tuple(v)) if isinstance(v, (list, tuple)) else v

    return [sys.executable, "-m", "llavaction_jax", "train"] + [f"--config.{k}={v}" for k, v in flat(cfg.to_dict())]


def subprocess_env(devices: int = 8) -> dict:
    """The environment of a child `train` process: `devices` fake CPU devices, the suite's collective flags, compiled
    fast (the tiny runs compile far more than they run)."""
    from conftest import COLLECTIVE_FLAGS

    return thread_pool_env(dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_FLAGS} {FAST_COMPILE_FLAG}")), devices)


def corrupt_record(shard: pathlib.Path, uid: str) -> None:
    """Flip bytes inside clip `uid`'s record of an (uncompressed) ArrayRecord shard, keeping the file size: the
    chunk's hash no longer matches, as after a disk error."""
    raw = bytearray(shard.read_bytes())
    pos = raw.index(f'"uid":"{uid}"'.encode())
    assert pos % 65536 > 64, "too close to a Riegeli block header"
    for i in range(pos, pos + 8):
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))


def assert_same_tree(a, b) -> None:
    import jax

    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
