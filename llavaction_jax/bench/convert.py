"""Benchmark: import and export of upstream-layout checkpoints of three sizes; wall time, MB/s, peak RSS, slope.

Each checkpoint is generated here, streaming (one tensor in memory at a time), in bf16 like the released models:
a Qwen2 with wide layers (hidden 2048, MLP 11008, GQA 16/2 heads, 32k vocab, untied) and a small SigLIP, in
two shards with an index; 12, 24 and 48 layers give about 2.1, 4.0 and 7.7 GB. Each measured command runs in
its own child process; its peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` read by a small wrapper process,
and the same is measured for a bare interpreter that only imports the converter (the baseline). The slope of
peak RSS over baseline against checkpoint size tells whether memory grows with the model. Target: flat, and
< 1.5 GB above baseline at every size.

    python -m llavaction_jax.bench.convert [--layers 12 24 48] [--dir /tmp] [--keep] [--no-write]
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

from llavaction_jax.bench.common import record
from llavaction_jax.config import ModelConfig, TextConfig, VisionConfig
from llavaction_jax.convert.keys import map_key, torch_shape, upstream_keys
from llavaction_jax.convert.safetensors_io import (SafetensorsCheckpoint, SafetensorsWriter, TensorSpec, plan_shards,
                                                   shard_names, write_index)
from llavaction_jax.convert.upstream_config import to_upstream
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths

# Runs a command and prints its peak RSS (KiB), so each measurement sees only its own child.
_WRAPPER = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
_BASELINE = "import jax, orbax.checkpoint, llavaction_jax.convert.from_torch, llavaction_jax.convert.cli; jax.devices()"


def bench_config(layers: int):
    return ModelConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, image_size=224,
                            patch_size=14),
        text=TextConfig(vocab_size=32768, hidden_size=2048, intermediate_size=11008, num_layers=layers, num_heads=16,
                        num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=32768),
        vision_tower="bench-siglip", newline_position="grid", vision_supervision="one_token", action_types=(97, 300, 3806),
    )


def write_source(directory: pathlib.Path, cfg) -> tuple[int, int]:
    """Stream a random bf16 upstream-layout checkpoint into `directory`; returns (bytes, largest stacked param)."""
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
    config = to_upstream(cfg)
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
    with SafetensorsCheckpoint(a) as x, SafetensorsCheckpoint(b) as y:
        return all(x.read(k).tobytes() == y.read(k).tobytes() for k in keys)


def measure_size(work: pathlib.Path, layers: int, base: int) -> dict:
    """Generate, import, export and spot-check one checkpoint; returns its numbers."""
    cfg = bench_config(layers)
    t0 = time.perf_counter()
    size, largest = write_source(work / "torch", cfg)
    gen = time.perf_counter() - t0
    convert = [sys.executable, "-m", "llavaction_jax", "convert"]
    wall_in, rss_in = measure(convert + ["from-torch", str(work / "torch"), str(work / "ours"), "--no-progress",
                                         "--vision-config", str(work / "siglip.json")])
    wall_out, rss_out = measure(convert + ["to-torch", str(work / "ours"), str(work / "back"), "--no-progress",
                                           "--max-shard-size", "1.5GB"])
    spot = ["model.embed_tokens.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight", "action_head.weight",
            "lm_head.weight", "model.layers.0.self_attn.k_proj.bias"]
    if not same_tensors(work / "torch", work / "back", spot):
        raise RuntimeError("round trip changed tensor bytes")
    return dict(layers=layers, gb=size / 1e9, largest=largest, gen=gen, wall_in=wall_in, wall_out=wall_out,
                over_in=(rss_in - base) / 1e6, over_out=(rss_out - base) / 1e6, rss_in=rss_in, rss_out=rss_out)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 for a single point)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48],
                        help="Qwen2 layer counts to measure (12 gives about 2.1 GB, 48 about 7.7 GB)")
    parser.add_argument("--dir", default="/tmp", help="where the temporary checkpoints go (deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    _, base = measure([sys.executable, "-c", _BASELINE])
    results = []
    for layers in args.layers:
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"llavaction-bench-convert-{layers}-", dir=args.dir))
        try:
            results.append(measure_size(work, layers, base))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        r = results[-1]
        print(f"{layers} layers, {r['gb']:.2f} GB: import {r['wall_in']:.1f} s +{r['over_in']:.0f} MB, "
              f"export {r['wall_out']:.1f} s +{r['over_out']:.0f} MB", flush=True)
    lines = [f"- checkpoints: bf16 upstream layout, 2 shards (Qwen2 N x 2048 wide, MLP 11008, vocab 32768 untied; "
             f"SigLIP 2 x 256); default --buffer-size 256MiB",
             f"- baseline (interpreter + converter imports): peak RSS {base / 1e6:.0f} MB"]
    for r in results:
        mb = r["gb"] * 1e3
        lines.append(
            f"- {r['layers']} layers, {r['gb']:.2f} GB (largest stacked param {r['largest'] / 1e6:.0f} MB): "
            f"import {r['wall_in']:.1f} s, {mb / r['wall_in']:.0f} MB/s, peak RSS +{r['over_in']:.0f} MB over baseline; "
            f"export (1.5GB shards) {r['wall_out']:.1f} s, {mb / r['wall_out']:.0f} MB/s, +{r['over_out']:.0f} MB; "
            f"spot-checked tensors byte-identical")
    gbs = [r["gb"] for r in results]
    for name, key in (("import", "over_in"), ("export", "over_out")):
        ys = [r[key] for r in results]
        lines.append(f"- {name} peak RSS over baseline: slope {slope(gbs, ys):+.0f} MB per GB of checkpoint, "
                     f"max +{max(ys):.0f} MB (target: flat, < 1500 MB at every size)")
    sizes = ", ".join(str(n) for n in args.layers)
    record(f"checkpoint conversion ({sizes} layers, streaming)", "python -m llavaction_jax.bench.convert", lines,
           write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
