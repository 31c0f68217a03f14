"""Benchmark: import (and export) of an upstream-layout checkpoint of about 2 GB; wall time, MB/s, peak RSS.

The checkpoint is generated here, streaming (one tensor in memory at a time), in bf16 like the released models:
a Qwen2 with wide layers (hidden 2048, MLP 11008, GQA 16/2 heads, 32k vocab, untied) and a small SigLIP, in
two shards with an index. Each measured command runs in its own child process; its peak RSS is
`getrusage(RUSAGE_CHILDREN).ru_maxrss` read by a small wrapper process, and the same is measured for a bare
interpreter that only imports the converter (the baseline). Target: import peak RSS < 1.5 GB above baseline.

    python -m llavaction_jax.bench.convert [--layers 12] [--dir /tmp] [--keep] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

# Runs a command and prints its peak RSS (KiB), so each measurement sees only its own child.
_WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
_BASELINE = "import jax, orbax.checkpoint, llavaction_jax.convert.from_torch, llavaction_jax.convert.cli; jax.devices()"


def bench_config(layers: int):
    from llavaction_jax.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, image_size=224,
                            patch_size=14),
        text=TextConfig(vocab_size=32768, hidden_size=2048, intermediate_size=11008, num_layers=layers, num_heads=16,
                        num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=32768),
        vision_tower="bench-siglip", newline_position="grid", vision_supervision="one_token", action_types=(97, 300, 3806),
    )


def write_source(directory: pathlib.Path, cfg) -> tuple[int, int]:
    """Stream a random bf16 upstream-layout checkpoint into `directory`; returns (bytes, largest stacked param)."""
    from llavaction_jax.convert.import_plan import torch_shape
    from llavaction_jax.convert.keys import map_key, upstream_keys
    from llavaction_jax.convert.safetensors_io import SafetensorsWriter, TensorSpec, plan_shards, shard_names, write_index
    from llavaction_jax.model import llava
    from llavaction_jax.model.params import flatten_paths

    directory.mkdir(parents=True)
    specs = flatten_paths(llava.param_specs(cfg))
    tensors = []
    for key in upstream_keys(cfg):
        path, layer, tf = map_key(key)
        shape = specs[path].shape[1:] if layer is not None else specs[path].shape
        tensors.append(TensorSpec(key, torch_shape(shape, tf), np.dtype(ml_dtypes.bfloat16)))
    total = sum(t.nbytes for t in tensors)
    shards = plan_shards(tensors, math.ceil(total / 2))
    rng = np.random.default_rng(0)
    for name, shard in zip(shard_names(len(shards)), shards):
        writer = SafetensorsWriter(directory / name, shard)
        for t in shard:  # random bf16 bit patterns of magnitude < 2: realistic, incompressible, cheap to make
            bits = rng.integers(0x0000, 0x4000, size=t.shape, dtype=np.uint16) | (rng.integers(0, 2, t.shape, np.uint16) << 15)
            writer.write(t.key, bits.view(ml_dtypes.bfloat16))
        writer.close()
    write_index(directory, shards)
    vision = dict(hidden_size=cfg.vision.hidden_size, intermediate_size=cfg.vision.intermediate_size,
                  num_hidden_layers=cfg.vision.num_layers + 1, num_attention_heads=cfg.vision.num_heads,
                  image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    (directory.parent / "siglip.json").write_text(json.dumps(vision))
    config = cfg.to_upstream()
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    largest = max(int(np.prod(s.shape)) * 2 for p, s in specs.items() if s.axes[:1] == ("layers",))
    return total, largest


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd` run as a child of a fresh wrapper process."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        rc, kib = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        rc, kib = -1, 0
    if out.returncode or rc:
        raise RuntimeError(f"benchmark command failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return wall, kib * 1024


def same_tensors(a: pathlib.Path, b: pathlib.Path, keys: list[str]) -> bool:
    from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(a) as x, SafetensorsCheckpoint(b) as y:
        return all(x.read(k).tobytes() == y.read(k).tobytes() for k in keys)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="Qwen2 layers (12 gives about 2.1 GB)")
    parser.add_argument("--dir", default="/tmp", help="where the temporary checkpoints go (deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    from llavaction_jax.bench.common import record

    work = pathlib.Path(tempfile.mkdtemp(prefix="llavaction-bench-convert-", dir=args.dir))
    try:
        cfg = bench_config(args.layers)
        t0 = time.perf_counter()
        size, largest = write_source(work / "torch", cfg)
        gen = time.perf_counter() - t0
        py = sys.executable
        _, base = measure([py, "-c", _BASELINE])
        convert = [py, "-m", "llavaction_jax", "convert"]
        wall_in, rss_in = measure(convert + ["from-torch", str(work / "torch"), str(work / "ours"), "--no-progress",
                                             "--vision-config", str(work / "siglip.json")])
        wall_out, rss_out = measure(convert + ["to-torch", str(work / "ours"), str(work / "back"), "--no-progress",
                                               "--max-shard-size", "1.5GB"])
        spot = ["model.embed_tokens.weight", f"model.layers.{args.layers - 1}.mlp.down_proj.weight", "action_head.weight"]
        if not same_tensors(work / "torch", work / "back", spot):
            raise RuntimeError("round trip changed tensor bytes")
        mb = size / 1e6
        lines = [
            f"- checkpoint: {size / 1e9:.2f} GB bf16 upstream layout, 2 shards (Qwen2 {args.layers} x 2048 wide, "
            f"MLP 11008, vocab 32768 untied; SigLIP 2 x 256); largest stacked param {largest / 1e6:.0f} MB; "
            f"generated in {gen:.1f} s",
            f"- baseline (interpreter + converter imports): peak RSS {base / 1e6:.0f} MB",
            f"- import  (from-torch): {wall_in:.1f} s, {mb / wall_in:.0f} MB/s, peak RSS {rss_in / 1e6:.0f} MB "
            f"(+{(rss_in - base) / 1e6:.0f} MB over baseline; target < 1500 MB)",
            f"- export  (to-torch, 1.5GB shards): {wall_out:.1f} s, {mb / wall_out:.0f} MB/s, peak RSS "
            f"{rss_out / 1e6:.0f} MB (+{(rss_out - base) / 1e6:.0f} MB); spot-checked tensors byte-identical",
        ]
        record("checkpoint conversion (2 GB, streaming)", "python -m llavaction_jax.bench.convert", lines,
               write=not args.no_write)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
