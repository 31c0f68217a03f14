"""Benchmark: what the training loop costs on top of its jitted step, in the demo's setting.

The demo's data and recipe (llavaction_jax/demo: synthetic EK100 videos -> frame shards -> MQA training samples,
its tokenizer, the tiny model with 8 px patches, global batch 16 on one device, a log line every tenth of the run,
checkpoints at its middle and end), trained for --steps steps by the real loop (train/loop.py: Grain pipeline,
mesh, Orbax checkpoints). The loop measures itself (train/metrics.py: LoopClock): the wall time per step between
log lines against the jitted step timed alone (one step per log interval, dispatched with the device idle and
waited for), both medians over the same run, and the same in CPU seconds (what the loop's work costs where no core
is idle to hide it; other jobs on the machine do not change it). Target: the loop's own cost under 5% of the jitted
step's time.

    python -m llavaction_jax.bench.train_loop [--steps 300] [--segments-per-action 30] [--read-threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

from llavaction_jax import demo
from llavaction_jax.bench.common import record
from llavaction_jax.host import reader_threads, usable_cores
from llavaction_jax.train.loop import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (the demo trains 800)")
    parser.add_argument("--segments-per-action", type=int, default=30, help="the demo's data size (default 30)")
    parser.add_argument("--read-threads", type=int, default=0,
                        help="threads encoding samples (data.read_threads; default 0: half the cores, 1 to 4)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.read_threads < 0:
        parser.error(f"--read-threads {args.read_threads}: must be 0 (half the cores, 1 to 4) or more")
    settings = argparse.Namespace(segments_per_action=args.segments_per_action, steps=args.steps, batch_size=16,
                                  num_frames=4, seed=0)
    with tempfile.TemporaryDirectory(prefix="train_loop_bench_") as tmp:
        out = pathlib.Path(tmp)
        inputs = demo.prepare(out, settings, demo.Stages())
        cfg = demo.train_config(out, inputs, settings)
        cfg.data.read_threads = args.read_threads
        load_start = os.getloadavg()
        summary = train(cfg)
        load_end = os.getloadavg()
    if "loop_overhead" not in summary:
        raise SystemExit(f"the run measured no loop overhead (too few log intervals in {args.steps} steps)")
    cmd = "python -m llavaction_jax.bench.train_loop " + " ".join(argv if argv is not None else sys.argv[1:])
    record("train loop: its own cost against the jitted step (demo setting)", cmd.strip(), [
        f"- setting: the demo's data ({args.segments_per_action} segments per action) and recipe: tiny model with "
        f"8 px patches, global batch 16, 4 frames, one CPU device; {args.steps} steps, a log line every "
        f"{cfg.train.log_every} steps, checkpoints every {cfg.train.checkpoint_every}; "
        f"{reader_threads(args.read_threads)} reader thread(s), {usable_cores()} cores",
        f"- wall time per step between log lines (median over the run): **{summary['step_time_s']:.3f} s**",
        f"- the jitted step alone (one step per log interval, median): **{summary['jitted_step_s']:.3f} s**",
        f"- loop overhead = (wall - jitted) / jitted: **{summary['loop_overhead']:+.1%}** (target: under 5%)",
        f"- in this process's CPU time (all threads): {summary['step_cpu_s']:.3f} s per step in the loop against "
        f"{summary['jitted_step_cpu_s']:.3f} s for the step alone ({summary['loop_cpu_overhead']:+.1%}): the loop's "
        "own work (data loading, transfers) where no core is idle to hide it",
        f"- host load average (1 min) at start / end of training: {load_start[0]:.1f} / {load_end[0]:.1f}",
    ], write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
