"""Benchmark: how much the training pipeline's reader threads slow the XLA work beside them (data.read_threads).

The demo's data and pipeline (synthetic EK100 videos -> frame shards -> MQA training samples with its tokenizer and
prompts, as bench/train_loop.py builds them) iterated without pause in a thread, beside a jitted fp32 program of
fixed work (a chain of 400 matmuls of 512 x 512, 1.2 s on one core of the 2026-12-07 host) timed again and
again: alone, then beside the pipeline with each reader count. Rounds alternate the settings, so a host whose
speed drifts moves them all alike; the medians are reported against the program alone.

A reader decodes frames and tokenizes outside the GIL, so each busy reader can hold a core: readers beyond the
cores XLA leaves free take cores from it. With one XLA thread (PJRT_NPROC=1, as the test suite runs) on a 2-core
host one core is free, and the default (host.reader_threads: half the cores, 1 to 4) is one reader. The pipeline
here never waits for a consumer, so this is the worst case: in training it works ahead only as far as its
prefetch buffer.

    PJRT_NPROC=1 python -m llavaction_jax.bench.reader_threads [--threads 1,2,4] [--rounds 4] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp

from llavaction_jax import demo
from llavaction_jax.bench.common import record
from llavaction_jax.host import reader_threads, usable_cores
from llavaction_jax.recipes import model_config
from llavaction_jax.train.loop import make_data


def fixed_work(size: int = 512, depth: int = 400):
    """A jitted program of `depth` dependent (size x size) fp32 matmuls, compiled; returns a call that runs it."""
    x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32) / size**0.5

    @jax.jit
    def program(x):
        return jax.lax.fori_loop(0, depth, lambda _, y: jnp.tanh(y @ x), x)

    program(x).block_until_ready()
    return lambda: program(x).block_until_ready()


def keep_reading(pipeline, stop: threading.Event) -> None:
    while not stop.is_set():
        next(pipeline)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2,4", help="reader counts to run beside the program")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each times every setting (default 4)")
    parser.add_argument("--repeats", type=int, default=6, help="timed runs of the program per setting and round")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    if min(counts) < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--threads counts, --rounds and --repeats must be at least 1")
    settings = argparse.Namespace(segments_per_action=30, steps=100, batch_size=16, num_frames=4, seed=0)
    with tempfile.TemporaryDirectory(prefix="reader_threads_bench_") as tmp:
        out = pathlib.Path(tmp)
        inputs = demo.prepare(out, settings, demo.Stages())
        cfg = demo.train_config(out, inputs, settings)
        pipelines = {}
        for n in counts:
            cfg.data.read_threads = n
            pipelines[n] = iter(make_data(cfg, model_config(cfg), settings.batch_size)[0])
            next(pipelines[n])  # start its threads, open its shards
        run = fixed_work()
        times: dict[str, list[float]] = {"alone": [], **{f"{n} reader(s)": [] for n in counts}}
        for _ in range(args.rounds):
            for name in times:
                stop, busy = threading.Event(), None
                if name != "alone":
                    pipeline = pipelines[int(name.split()[0])]
                    busy = threading.Thread(target=keep_reading, args=(pipeline, stop), daemon=True)
                    busy.start()
                    time.sleep(0.2)  # the readers at work
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
                stop.set()
                if busy is not None:
                    busy.join()
    alone = statistics.median(times["alone"])
    lines = [f"- setting: the demo's training pipeline (batch 16, 4 frames of 64 px as PNG, its tokenizer and EK100 "
             f"prompts) iterated without pause in a thread beside a jitted chain of 400 fp32 512x512 matmuls; "
             f"{usable_cores()} cores, PJRT_NPROC={os.environ.get('PJRT_NPROC', 'unset')}; "
             f"{args.rounds} rounds x {args.repeats} runs per setting, medians",
             f"- the program alone: {alone * 1e3:.0f} ms"]
    for n in counts:
        t = statistics.median(times[f"{n} reader(s)"])
        lines.append(f"- beside {n} reader(s): {t * 1e3:.0f} ms (**{t / alone - 1:+.0%}**)")
    lines.append(f"- the default here (data.read_threads=0): {reader_threads(0)} reader(s)")
    cmd = "python -m llavaction_jax.bench.reader_threads " + " ".join(argv if argv is not None else sys.argv[1:])
    if os.environ.get("PJRT_NPROC"):
        cmd = f"PJRT_NPROC={os.environ['PJRT_NPROC']} {cmd}"
    record("reader threads: the XLA work beside the training pipeline", cmd.strip(), lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
