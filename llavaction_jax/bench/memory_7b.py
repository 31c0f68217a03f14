"""Benchmark: per-device memory of the LLaVAction-7B training step, from an AOT compile (nothing runs).

The real recipe (docs/checkpoints.md; llavaction/train/llava_trainer.py: LLaVATrainer.create_optimizer):
LLaVAction-7B, fp32 master params with bf16 compute, AdamW over all
parameters, 64 frames (13441 visual tokens) + text = a 16384-token sequence, micro-batch 1 per data-parallel
device, "flash" attention, remat "full". The state and batch exist only as `jax.ShapeDtypeStruct`s with their
shardings, and the step is `train.step.jit_train_step`, as `bench.aot_programs.train_program` builds them (the
same program bench.aot compiles for TPU slices and H100s); here it is lowered and compiled for a virtual
8-device CPU mesh, and `compiled.memory_analysis()` gives each device's argument / output / temp bytes.

Meshes: FSDP-8 (data 1, fsdp 8, tensor 1; global batch 8) and FSDP-4 x TP-2 (data 1, fsdp 4, tensor 2; global
batch 4). Caveat: this is XLA:CPU's buffer assignment. XLA:GPU fuses and schedules differently, and CPU may keep
some bf16 intermediates in fp32, so the numbers estimate, not measure, the GPU footprint.

    python -m llavaction_jax.bench.memory_7b [--policies full,dots_no_batch] [--meshes fsdp8,fsdp4_tp2] [--no-write]
    python -m llavaction_jax.bench.memory_7b --top-buffers 12 --no-write   # where the temp bytes go

`--top-buffers N` dumps XLA's buffer assignment (XLA_FLAGS --xla_dump_to, a temporary directory) and lists the N
largest distinct buffers of the temp allocation with their shapes, e.g. logits or attention tiles.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

# A virtual 8-device CPU platform: must be set before jax is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if any(a.startswith("--top-buffers") for a in sys.argv) and "--xla_dump_to" not in os.environ["XLA_FLAGS"]:
    _DUMP_DIR = tempfile.mkdtemp(prefix="memory_7b_xla_dump_")
    os.environ["XLA_FLAGS"] += f" --xla_dump_to={_DUMP_DIR} --xla_dump_hlo_module_re=jit_step"
else:
    _DUMP_DIR = None

# Below the XLA_FLAGS / JAX_PLATFORMS setup on purpose: jax reads them when it is imported.
import jax  # noqa: E402

from llavaction_jax import cli_flags  # noqa: E402
from llavaction_jax.bench.aot_programs import train_program  # noqa: E402
from llavaction_jax.bench.common import record  # noqa: E402
from llavaction_jax.config import ResolvedExecution, load_preset  # noqa: E402
from llavaction_jax.sharding import make_mesh  # noqa: E402

MESHES = {"fsdp8": dict(data=1, fsdp=8, tensor=1), "fsdp4_tp2": dict(data=1, fsdp=4, tensor=2)}
BUDGET = 80e9  # bytes: "80 GB" taken as 80e9 (74.5 GiB), below an H100's 79.6 GiB, so a fit is conservative
GIB = 2**30


def compile_step(policy: str, mesh_name: str, frames: int, seq: int, micro_batches: int):
    """AOT-compile the 7B step; returns (facts dict, compiled)."""
    # Compiled for accelerator-like use, never run: the execution fields are set as a GPU run resolves them
    # (chunked loss, sharded work inside loops, every frame at once), not as this CPU would.
    cfg = load_preset("llavaction_7b", {"param_dtype": "float32"})
    execution = ResolvedExecution(compute_dtype="bfloat16", attention="flash", remat_policy=policy,
                                  vision_frames_per_step=-1, loop_collectives="on", platform="gpu")
    mesh = make_mesh(**MESHES[mesh_name])
    program = train_program(cfg, execution, mesh, frames, seq, micro_batches=micro_batches)  # what bench.aot compiles
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = program.jitted.lower(*program.args)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    f = program.facts
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    facts = dict(policy=policy, mesh=mesh_name, mesh_shape=dict(mesh.shape), batch=f["global_batch"],
                 text_len=f["text_len"], visual=f["visual"], seq=f["text_len"] - 1 + f["visual"],
                 n_params=f["n_params"], state_bytes=f["state_bytes"],
                 argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes, alias=ma.alias_size_in_bytes,
                 temp=ma.temp_size_in_bytes, code=ma.generated_code_size_in_bytes, total=total,
                 lower_s=lower_s, compile_s=compile_s)
    return facts, compiled


def largest_temp_buffers(dump_dir: str, seen: set, n: int) -> list[str]:
    """The n largest distinct buffers (by offset) in the temp allocation of the newest dumped jit_step module."""
    files = [p for p in pathlib.Path(dump_dir).glob("*jit_step*after_optimizations-buffer-assignment.txt") if p not in seen]
    if not files:
        return []
    newest = max(files, key=lambda p: p.stat().st_mtime)
    seen.add(newest)
    text = newest.read_text()
    start = text.find("preallocated-temp")
    end = text.find("\nallocation ", start)
    value = re.compile(r"value: <\d+ (\S+)[^>]*> \(size=(\d+),offset=(\d+)\): (\S+)")
    buffers = {}
    for name, size, offset, shape in value.findall(text[start:end if end > 0 else None]):
        buffers.setdefault((int(offset), int(size)), (shape.split("{")[0], name))
    top = sorted(buffers.items(), key=lambda kv: -kv[0][1])[:n]
    return [f"{size / GIB:.2f} GiB at {offset / GIB:.1f} GiB: {shape} ({name})" for (offset, size), (shape, name) in top]


def describe(f: dict) -> str:
    g = lambda n: f"{n / GIB:.1f} GiB"
    fits = "fits" if f["total"] <= BUDGET else "DOES NOT FIT"
    return (f"- {f['mesh']} {f['mesh_shape']}, remat {f['policy']}, global batch {f['batch']}: per device argument "
            f"{g(f['argument'])}, output {g(f['output'])} (aliased with the donated state: {g(f['alias'])}), temp "
            f"{g(f['temp'])}, **total {g(f['total'])}** -> {fits} in 80 GB; compile {f['compile_s']:.0f} s "
            f"(lowering {f['lower_s']:.0f} s)" + "".join(f"\n  - temp buffer {line}" for line in f.get("top", [])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="full,dots_no_batch", help="comma list of remat policies")
    parser.add_argument("--meshes", default="fsdp8,fsdp4_tp2", help=f"comma list of {sorted(MESHES)}")
    cli_flags.add_num_frames(parser, "the model input's", default=64)
    parser.add_argument("--seq", type=int, default=16384, help="spliced sequence length (visual + text tokens)")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches (lax.scan)")
    parser.add_argument("--top-buffers", type=int, default=0, metavar="N",
                        help="also list the N largest temp buffers of each compiled step (XLA dump)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    if jax.device_count() < 8:
        raise SystemExit(f"need 8 (virtual) devices, have {jax.device_count()}: run in a fresh process "
                         "(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported)")
    results, dumped = [], set()
    for policy in args.policies.split(","):
        for mesh_name in args.meshes.split(","):
            facts, _ = compile_step(policy.strip(), mesh_name.strip(), args.num_frames, args.seq, args.micro_batches)
            if args.top_buffers and _DUMP_DIR:
                facts["top"] = largest_temp_buffers(_DUMP_DIR, dumped, args.top_buffers)
            print(describe(facts), flush=True)
            results.append(facts)

    if _DUMP_DIR:
        shutil.rmtree(_DUMP_DIR, ignore_errors=True)
    f0 = results[0]
    cmd = "python -m llavaction_jax.bench.memory_7b " + " ".join(argv if argv is not None else sys.argv[1:])
    record("memory: LLaVAction-7B train step, 64 frames, 16k tokens, AOT on a virtual 8-device mesh", cmd.strip(), [
        f"- model: llavaction_7b preset, {f0['n_params'] / 1e9:.2f} B params fp32 (master) + AdamW mu/nu fp32 = "
        f"{f0['state_bytes'] / GIB:.1f} GiB of state in all; compute bf16; attention flash; all parts trained",
        f"- batch: micro-batch 1 per data-parallel device ({args.micro_batches} micro-batch(es) per step), "
        f"{args.num_frames} frames x 384 px ({f0['visual']} visual tokens) + {f0['text_len'] - 1} text tokens = "
        f"{f0['seq']} tokens per sample",
        *[describe(f) for f in results],
        "- total = argument + output - aliased + temp, from `compiled.memory_analysis()` of the per-device SPMD "
        "program; 80 GB taken as 80e9 bytes (74.5 GiB)",
        "- caveat: XLA:CPU's buffer assignment, not a GPU measurement (XLA:GPU fuses and schedules differently; "
        "CPU may keep some bf16 intermediates in fp32); leave headroom for the allocator, and raise "
        "XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) on GPU",
        f"- host load average (1 min) at start: {load_start[0]:.1f} (compile times depend on it)",
    ], write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
