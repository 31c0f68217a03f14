"""Ahead-of-time check: compile every job for a TPU slice or a set of H100 / H200 GPUs on this machine, no
accelerator needed, and say whether it fits, which kernels it uses and what it costs (docs/aot.md).

    python -m llavaction_jax.bench.aot --topology v5p:2x2x2 --model llavaction_7b --job train
    python -m llavaction_jax.bench.aot --topology v5e:2x2 --model tiny --job all --json out.json
    python -m llavaction_jax.bench.aot --topology v5e:2x2 --model configs/llavaction_0_5b.py --job train --search
    python -m llavaction_jax.bench.aot --topology h100:8 --model llavaction_7b --job all   # needs jax[cuda12]

Jobs (real shapes, abstract arrays: no parameter is materialised; bench/aot_programs.py):
  train  the recipe's fine-tuning step: fp32 masters, bf16 compute, `--remat`, AdamW over all parts, `--num-frames`
         frames in the recipe's length bucket, micro-batches of one sample per data-parallel chip accumulated to the
         paper's global batch of 256. Mesh: configs/train.py's (FSDP over every chip).
  eval   the EK100-MQA evaluation at batch 8 (`eval --mode both`): 64-frame prefill, greedy decode, option scoring;
         bf16 params. Mesh: the eval command's default (data parallel).
One row per job: the attention kernel each tower's attention became (read from the compiled program), bytes per
chip (arguments, temporaries, outputs; total = arguments + outputs - aliased + temporaries) against the chip's
memory, fits, compile seconds, the analytic model FLOPs and the roofline lower bound on step time they imply at
the chip's bf16 peak (an estimate, not a time), and on GPU the kernels the program calls. `--search` walks up the
generation's slices (and, for training, the remat policies) to the smallest slice / cheapest policy that fits.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

from llavaction_jax.bench import aot_targets

aot_targets.prepare_environment()  # before JAX starts a backend

import jax  # noqa: E402

from llavaction_jax import cli_flags  # noqa: E402
from llavaction_jax.bench import aot_hlo, aot_programs  # noqa: E402
from llavaction_jax.bench.common import record  # noqa: E402
from llavaction_jax.config import (ATTENTION_IMPLS, REMAT_POLICIES, ExecutionConfig, ModelConfig,  # noqa: E402
                                   ResolvedExecution, model_file_configs, preset_configs)
from llavaction_jax.recipes import load_recipe  # noqa: E402
from llavaction_jax.sharding import make_mesh, parse_mesh  # noqa: E402

GIB = 2**30
JOBS = ("train", "eval")
REMAT_BY_COST = ("none", "dots", "dots_no_batch", "full")  # least recomputation first
FSDP_ALL = {"data": 1, "fsdp": -1, "tensor": 1}
XLA_FLOPS_CAVEAT = "XLA cost analysis, per chip; loop bodies (layers, micro-batches, decode steps) counted once"


def load_model(name: str) -> tuple[tuple[ModelConfig, ExecutionConfig], str]:
    """A preset name (configs/<name>.py) or a model config file path -> ((model config, its execution choices),
    label)."""
    path = pathlib.Path(name)
    if path.suffix == ".py" and path.is_file():
        return model_file_configs(path), path.stem
    return preset_configs(name), name


def job_config(base: tuple[ModelConfig, ExecutionConfig], job: str, attention: str, remat: str, platform: str,
               chips: int) -> tuple[ModelConfig, ResolvedExecution]:
    """The recipe's numerics for a job, the execution resolved for the target: training keeps fp32 masters (the
    train command's master_dtype) and computes in bf16; evaluation loads bf16 params (the released checkpoints')."""
    cfg, execution = base
    fields = dict(compute_dtype="bfloat16", attention=attention)
    if job == "train":
        fields["remat_policy"] = remat
    cfg = cfg.replace(param_dtype="float32" if job == "train" else "bfloat16")
    return cfg, execution.replace(**fields).resolve(platform, chips)


def default_mesh(job: str) -> dict:
    if job == "train":
        return dict(load_recipe("train").mesh)
    return parse_mesh(cli_flags.DEFAULT_MESH)


def compile_job(args, base: tuple[ModelConfig, ExecutionConfig], label: str, job: str, topology: str,
                mesh_axes: dict, remat: str) -> dict:
    """Lower and compile one job for one slice; returns its row (see the module docstring)."""
    chip, devices = aot_targets.target_devices(topology)
    mesh = make_mesh(**mesh_axes, devices=devices)
    cfg, execution = job_config(base, job, args.attention, remat, chip.platform, len(devices))
    if job == "train":
        seq = args.seq or aot_programs.length_bucket(cfg.tokens_per_video(args.num_frames) + aot_programs.TEXT_TOKENS,
                                                     cfg.tokenizer_model_max_length)
        programs = [aot_programs.train_program(cfg, execution, mesh, args.num_frames, seq,
                                               global_batch=args.global_batch)]
    else:
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        batch = -(-args.eval_batch // ways) * ways  # the smallest multiple of the batch axes that holds it
        programs = aot_programs.eval_programs(cfg, execution, mesh, args.num_frames, batch, args.max_new_tokens)
    parts = [compile_program(p, mesh, chip) for p in programs]
    worst = max(parts, key=lambda p: p["bytes_per_chip"]["total"])
    flops = sum(p["flops"] for p in parts)
    row = {
        "job": job, "model": label, "topology": topology, "chip": chip.name, "chips": len(devices),
        "mesh": dict(mesh.shape), "attention_requested": args.attention,
        "attention": merge_kernels([p.pop("attention") for p in parts], cfg),
        "bytes_per_chip": worst["bytes_per_chip"], "chip_hbm_bytes": chip.hbm_bytes,
        # a TPU program over the compiler's own limit (the chip's memory less what the runtime keeps) is refused
        "fits": all(p["bytes_per_chip"]["total"] <= p.get("compiler_limit_bytes", chip.hbm_bytes)
                    and "compiler_message" not in p for p in parts),
        "over_by_bytes": max(max(0, p["bytes_per_chip"]["total"] - p.get("compiler_limit_bytes", chip.hbm_bytes))
                             for p in parts),
        "compile_s": round(sum(p["compile_s"] for p in parts), 1),
        "flops": flops, "roofline_s_estimate": flops / (len(devices) * chip.peak_bf16_flops),
        "settings": {**programs[0].facts, "remat": execution.remat_policy, "param_dtype": cfg.param_dtype,
                     "compute_dtype": execution.compute_dtype},
        "programs": {p.pop("name"): p for p in parts},
    }
    refused = [p for p in parts if "compiler_message" in p]
    if refused:  # the TPU compiler's own words and figures (its limit is the chip's memory less the runtime's)
        row.update(compiler_message=refused[0]["compiler_message"],
                   total_is_at_least=worst.get("total_is_at_least", False))
    if chip.platform == "gpu":  # over the job's programs (each program's own counts are under `programs`)
        row["gpu_kernels"] = dict(sorted(sum((collections.Counter(p["gpu_kernels"]) for p in parts),
                                             collections.Counter()).items()))
    return row


def compile_program(program: aot_programs.Program, mesh, chip) -> dict:
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = program.jitted.lower(*program.args, **program.static)
    lower_s = time.perf_counter() - t0
    try:
        compiled = lowered.compile()
    except Exception as error:  # the TPU compiler refuses a program that does not fit: that is a result too
        used = aot_hlo.tpu_out_of_memory(str(error))
        if used is None:
            raise
        unoptimized = lowered.as_text(dialect="hlo", debug_info=True)  # kernels as far as lowering shows them
        return {"name": program.name, "attention": aot_hlo.attention_kernels(unoptimized, calls_in_scope=False),
                "flops": program.flops, "bytes_per_chip": {used["counts"]: used["used"], "total": used["used"]},
                "total_is_at_least": used["counts"] != "total", "compiler_limit_bytes": used["limit"],
                "compiler_message": used["message"], "lower_s": round(lower_s, 1),
                "compile_s": round(time.perf_counter() - t0, 1), "gpu_kernels": {}}
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    text = compiled.as_text()
    cost = compiled.cost_analysis() or {}
    out = {"name": program.name, "attention": aot_hlo.attention_kernels(text), "flops": program.flops,
           "xla_flops_per_chip": cost.get("flops"), "xla_flops_caveat": XLA_FLOPS_CAVEAT,
           "bytes_per_chip": {"arguments": ma.argument_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
                              "outputs": ma.output_size_in_bytes, "aliased": ma.alias_size_in_bytes, "total": total},
           "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1)}
    if chip.platform == "gpu":
        out["gpu_kernels"] = aot_hlo.gpu_kernels(text)
    return out


def merge_kernels(found: list[dict], cfg: ModelConfig) -> dict:
    """One attention description per tower over the job's programs: "splash", or e.g. "splash; over the KV cache:
    xla". The vision tower's padding is named (splash pads the head dim to 128 lanes, cuDNN odd lengths by one)."""
    merged: dict[str, dict[str, set]] = {}
    for program in found:
        for tower, kinds in program.items():
            for kind, names in kinds.items():
                merged.setdefault(tower, {}).setdefault(kind, set()).update(names)
    out = {}
    for tower, kinds in merged.items():
        text = ", ".join(sorted(kinds.get("attention", ())))
        if tower == "vision":
            v = cfg.vision
            if "splash" in text and v.head_dim % 128:
                lanes = -(-v.head_dim // 128) * 128
                text = text.replace("splash", f"splash (head dim {v.head_dim} zero-padded to {lanes})")
            if "cudnn" in text and v.num_patches % 2:
                text = text.replace("cudnn", f"cudnn ({v.num_patches} patches padded to {v.num_patches + 1})")
        if "cache_attention" in kinds:
            text += f"; over the KV cache: {', '.join(sorted(kinds['cache_attention']))}"
        out[tower] = text
    return out


def _bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def describe(row: dict) -> str:
    b = row["bytes_per_chip"]
    fit = "fits" if row["fits"] else f"DOES NOT FIT (over by {_bytes(row['over_by_bytes'])})"
    kernels = "; ".join(f"{tower} {text}" for tower, text in row["attention"].items())
    parts = ", ".join(f"{k} {_bytes(b[k])}" for k in ("arguments", "temporaries", "outputs", "aliased") if k in b)
    line = (f"{row['job']:5} {row['model']} on {row['topology']} ({row['chips']} x {row['chip']}), mesh "
            f"{','.join(f'{k}={v}' for k, v in row['mesh'].items())}"
            f"{', remat ' + row['settings']['remat'] if row['job'] == 'train' else ''}: "
            f"{'>= ' * bool(row.get('total_is_at_least'))}{_bytes(b['total'])} per chip ({parts}) of "
            f"{_bytes(row['chip_hbm_bytes'])} -> "
            f"{fit}; attention {row['attention_requested']}: {kernels}; compile {row['compile_s']:.0f} s; "
            f"{row['flops'] / 1e12:.3g} TFLOP (model) -> roofline >= {_seconds(row['roofline_s_estimate'])} (estimate)")
    if row.get("compiler_message"):
        line += f"; TPU compiler: {row['compiler_message']}"
    if "gpu_kernels" in row:
        line += "; GPU kernels " + ", ".join(f"{k} x{n}" for k, n in row["gpu_kernels"].items())
    return line


def search(args, base, label, job, topology, mesh_axes) -> list[dict]:
    """The smallest slice of the generation (from `topology` up) where the job fits: training with the most frugal
    remat policy, then on that slice the cheapest policy that still fits; evaluation with the given mesh, then with
    its params sharded (FSDP over every chip). Every compiled row is returned."""
    chip, start = aot_targets.parse_topology(topology)
    slices = [start] + [s for s in chip.slices if aot_targets.chip_count(s) > aot_targets.chip_count(start)]
    meshes = [mesh_axes] + ([FSDP_ALL] if job == "eval" and mesh_axes != FSDP_ALL else [])
    rows = []

    def attempt(slice_name, mesh, remat):
        rows.append(compile_job(args, base, label, job, slice_name, mesh, remat))
        print(describe(rows[-1]), flush=True)
        return rows[-1]["fits"]

    frugal = "full" if job == "train" else args.remat
    fit = next(((s, m) for s in slices for m in meshes if attempt(s, m, frugal)), None)
    if job == "train" and fit:
        next((p for p in REMAT_BY_COST[:-1] if attempt(*fit, p)), None)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", required=True, help="v5e:2x2, v5p:2x2x2, v6e:4x4, h100:8, h200:16 ...")
    parser.add_argument("--model", required=True, help="preset name (configs/<NAME>.py) or a model config file")
    parser.add_argument("--job", choices=JOBS + ("all",), default="all")
    parser.add_argument("--mesh", type=cli_flags.mesh_shape, default=None, metavar="data=D,fsdp=F,tensor=T",
                        help="mesh over the slice's chips (default: train configs/train.py's, eval the eval command's)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                        help="the attention setting (ExecutionConfig.attention)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full", help="train: remat policy")
    cli_flags.add_num_frames(parser, "the model input's (64: the final LLaVAction model's)", default=64)
    parser.add_argument("--seq", type=int, default=0,
                        help="train: tokens per sample (default: the recipe's power-of-two length bucket of a "
                             f"{aot_programs.TEXT_TOKENS}-text-token sample)")
    parser.add_argument("--global-batch", type=int, default=aot_programs.PAPER_GLOBAL_BATCH,
                        help="train: samples per optimizer step (one per data-parallel chip per micro-batch)")
    parser.add_argument("--eval-batch", type=int, default=8, help="eval: questions per step")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="eval: generation budget (the eval default)")
    parser.add_argument("--search", action="store_true", help="find the smallest slice / remat policy that fits")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    parser.add_argument("--record", action="store_true", help="append the rows to BENCHMARKS.md")
    args = parser.parse_args(argv)

    try:
        chip, _ = aot_targets.parse_topology(args.topology)
        problem = aot_targets.target_problem(chip)
        if problem:
            raise aot_targets.TargetError(problem)
        base, label = load_model(args.model)
    except ValueError as error:
        print(f"bench.aot: error: {error}", file=sys.stderr)
        return 2
    rows, failed = [], False
    for job in JOBS if args.job == "all" else (args.job,):
        mesh_axes = args.mesh or default_mesh(job)
        try:
            if args.search:
                rows += search(args, base, label, job, args.topology, mesh_axes)
                continue
            rows.append(compile_job(args, base, label, job, args.topology, mesh_axes, args.remat))
            print(describe(rows[-1]), flush=True)
        except aot_targets.TargetError as error:
            print(f"bench.aot: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # a job that does not compile is a result: report it, go on, exit non-zero
            failed = True
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            rows.append({"job": job, "model": label, "topology": args.topology, "error": message})
            print(f"{job:5} {label} on {args.topology}: does not compile: {type(error).__name__}: {message}",
                  flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.record:
        command = "python -m llavaction_jax.bench.aot " + " ".join(argv if argv is not None else sys.argv[1:])
        record(f"ahead-of-time compile: {label} on {args.topology}", command,
               [f"- {describe(r)}" if "error" not in r else f"- {r['job']}: does not compile: {r['error']}"
                for r in rows])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
