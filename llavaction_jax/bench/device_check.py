"""Accelerator readiness check: one command, within `--budget` seconds on one GPU, every result in one table and JSON.

Sections, in order of what their numbers are worth (a section that cannot finish in the budget left is skipped
with the reason, so the valuable ones always run):

  devices     devices, JAX / CUDA versions, a bf16 matmul peak measured here, the specification's peak
  forward_7b  LLaVAction-7B (random weights, bf16) prefill of a 64-frame EK100-MQA prompt (~13.5k tokens):
              latency, compiled / peak memory, MFU against the measured peak and against the specification
  eval_7b     EK100-MQA evaluation at 64 frames, batch 1 then batch 8 (greedy answers of 8 tokens, one compile
              each): questions/s, the projected time for all 9,668 validation questions, batch 8 / batch 1
  train_0_5b  a LLaVAction-0.5B training step at 64 frames (fp32 master params, bf16 compute, remat, AdamW)
  attention   7B attention shapes (28 query / 4 KV heads, head dim 128) at 13.8k tokens, causal, right padding:
              cudnn and flash, max |difference| to fp32 xla on real query rows, forward and forward+backward time
  train_7b    the 7B training step on one device, when its state fits the device and time remains

How it keeps to its budget: the sections run one after another in a worker process (bench/device_sections.py);
each has an expected time (compile + run, `Sizes.expected`). A section is started only when its expected time fits
in what is left of the budget, and it gets a deadline of `ALLOWANCE` x that (at most what is left; the last
section may use all that is left): a section
still running then (a hung compile) is stopped by killing the worker, recorded as `timeout`, and the next section
runs in a fresh worker. Inside a section, each case is started only when its own expected time fits before the
deadline. Every measured case is printed and written to the JSON / markdown the moment the worker reports it, so a
run cut off at any point keeps everything measured so far.

Each model case runs first with `--attention` (default auto: cuDNN wherever the shapes allow it on GPU); a case
whose first attempt fails is retried once with `flash`, and both attempts are recorded. Inputs are placed on the
device before anything is timed; a case is compiled once and called once, repeated (up to `Sizes.repeats` calls,
median) only while a call takes under a second. MFU counts the LM head only where the program computes it.

`--smoke` runs the same code at tiny sizes on CPU, with expected times for a 2-core machine
(tests/test_device_check.py). Test hooks: `--attention cudnn` makes every model case's first attempt fail on a CPU
(cuDNN cannot run there), which exercises the retry with flash; the environment variable
`LLAVACTION_DEVICE_CHECK_HANG=<section>` makes the worker sleep at the start of that section, as a hung compile
would, which exercises the deadline.

    python -m llavaction_jax.bench.device_check [--budget S] [--out FILE.json] [--markdown FILE.md] [--smoke]
    bash launch/device_check.sh --out $OUT/device_check.json --markdown $OUT/device_check.md   # on a GPU host
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from llavaction_jax.bench.device_report import case_line, format_table, markdown_block, section_facts

ORDER = ("devices", "forward_7b", "eval_7b", "train_0_5b", "attention", "train_7b")
ALLOWANCE = 2.0  # a section's deadline, as a multiple of its expected time
HANG_ENV = "LLAVACTION_DEVICE_CHECK_HANG"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and `--smoke`."""
    name: str = "full"
    matmul: int = 8192
    attn_length: int = 13800
    attn_heads: tuple = (28, 4, 128)  # query heads, KV heads, head dim (Qwen2-7B)
    reference_rows: int = 1024  # fp32 reference on this many sampled query rows (all rows when shorter)
    big: str = "llavaction_7b"  # configs/<name>.py
    small: str = "llavaction_0_5b"
    frames: int = 64
    prompt: int = 127  # the EK100-MQA prompt at 64 frames with the Qwen2 tokenizer (ek100/prompts.py, data/chat.py)
    eval_batches: tuple = (1, 8)
    repeats: int = 3  # timed calls of a case at most (only calls under a second are repeated)
    assumed_memory: dict = dataclasses.field(default_factory=dict)  # section -> device bytes for the fit check
    # Seconds of compile + run per section on one H100 (worker start-up included in the first), and per case where
    # a section has several: estimates with margin, to be replaced by the section_s / compile_s a GPU run reports.
    # train_0_5b leaves room for a cuDNN compile that fails and the retry with flash.
    expected: dict = dataclasses.field(default_factory=lambda: dict(
        devices=30, forward_7b=75, eval_7b=110, train_0_5b=120, attention=45, train_7b=20))
    case_expected: dict = dataclasses.field(default_factory=lambda: {
        "eval_7b/batch 1": 45, "eval_7b/batch 8": 60, "train_7b/step": 150})
    worker_start: float = 15.0  # a fresh worker's start-up (interpreter, JAX, CUDA), added after a restart


# Every code path once at sizes that compile in seconds on a 2-core CPU; train_7b takes the does-not-fit path (as
# the 7B does on an H100).
SMOKE = Sizes(name="smoke", matmul=256, attn_length=48, attn_heads=(8, 2, 16), reference_rows=24, big="tiny",
              small="tiny", frames=2, prompt=24, eval_batches=(1, 2), repeats=2, assumed_memory={"train_7b": 2**20},
              expected=dict(devices=8, forward_7b=25, eval_7b=30, train_0_5b=45, attention=10, train_7b=5),
              case_expected={"eval_7b/batch 1": 12, "eval_7b/batch 2": 12, "train_7b/step": 60}, worker_start=5.0)
SIZES = {"full": Sizes(), "smoke": SMOKE}


def plan(expected_s: float, left_s: float, last: bool = False) -> tuple[float | None, str]:
    """(deadline in seconds, "") to run a section expected to take `expected_s` with `left_s` of the budget left,
    or (None, why it is skipped). The last section may use all that is left (nothing after it can lose time)."""
    if expected_s > left_s:
        return None, (f"needs about {expected_s:.0f} s (compile + run), {max(left_s, 0):.0f} s of the budget left")
    return left_s if last else min(left_s, ALLOWANCE * expected_s), ""


class Worker:
    """The process that runs sections (bench/device_sections.py): commands as JSON lines on its stdin, events as
    JSON lines appended to a file that `events()` reads as they come."""

    def __init__(self, sizes: str, attention: str, remat: str, events_dir: pathlib.Path, index: int):
        self.events_file = events_dir / f"worker{index}.jsonl"
        self.events_file.touch()
        self._offset, self._partial = 0, b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llavaction_jax.bench.device_sections", "--events", str(self.events_file),
             "--sizes", sizes, "--attention", attention, "--remat", remat],
            stdin=subprocess.PIPE, text=True, start_new_session=True)  # own group: a kill takes its children too

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def events(self) -> list[dict]:
        with self.events_file.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self, wait_s: float = 10.0) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=wait_s)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.kill()


def say_now(line: str) -> None:
    print(line, flush=True)


def run_checks(sizes: Sizes, budget: float, write, sections=ORDER, attention: str = "auto", remat: str = "full",
               spec_tflops: float | None = None, say=say_now) -> dict:
    """The sections in ORDER (devices always: it measures the MFU denominator), each planned against the budget
    left, run in a worker with a deadline; `write(results)` after every event."""
    start = time.monotonic()
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "smoke": sizes.name == "smoke", "budget_s": budget, "attention": attention,
               "order": [n for n in ORDER if n == "devices" or n in sections], "sections": {}}
    peaks = {"peak_flops": None, "spec_flops": spec_tflops * 1e12 if spec_tflops else None}
    worker, workers = None, 0
    with tempfile.TemporaryDirectory(prefix="device_check_") as events_dir:
        try:
            for name in results["order"]:
                out = results["sections"][name] = {"status": "pending", "cases": []}
                expected = sizes.expected[name] + (sizes.worker_start if worker is None and workers else 0.0)
                limit, why = plan(expected, budget - (time.monotonic() - start), name == results["order"][-1])
                if limit is None:
                    out.update(status="skipped", reason=why, section_s=0.0)
                    say(f"[device_check] {name}: skipped: {why}")
                    write(results)
                    continue
                if worker is None:
                    worker = Worker(sizes.name, attention, remat, pathlib.Path(events_dir), workers)
                    workers += 1
                t0 = time.monotonic()
                try:
                    worker.send({"section": name, "seconds": limit, **peaks})
                except OSError:  # the worker died starting up: wait_for_section reports it crashed
                    pass
                status = wait_for_section(worker, name, out, t0 + limit, results, write, say)
                out["section_s"] = time.monotonic() - t0
                if status in ("timeout", "crashed"):
                    worker.kill()
                    worker = None
                    out.update(status=status, reason=(
                        f"stopped at its deadline of {limit:.0f} s (expected {expected:.0f} s); the cases it reported "
                        "before are kept" if status == "timeout" else "the worker process died (see its output above)"))
                if name == "devices" and out.get("bf16_matmul_tflops"):
                    peaks["peak_flops"] = out["bf16_matmul_tflops"] * 1e12
                    peaks["spec_flops"] = peaks["spec_flops"] or out.get("spec_flops")
                say(f"[device_check] {name}: {out['status']} in {out['section_s']:.0f} s"
                    + (f" ({out['reason']})" if out.get("reason") else ""))
                write(results)
        finally:
            if worker is not None:
                worker.close()
    results["total_s"] = time.monotonic() - start
    write(results)
    return results


def wait_for_section(worker: Worker, name: str, out: dict, deadline: float, results: dict, write, say) -> str:
    """Merge the worker's events for section `name` into `out` as they come (printing and writing each) until it
    reports the section done ("ok", "partial", "error", ...), dies ("crashed") or passes `deadline` ("timeout")."""
    while True:
        alive = worker.alive()  # before reading: the events of a worker that has just died are still read
        for event in worker.events():
            out["status"] = "running"
            if event["kind"] == "facts":
                out.update(event["facts"])
                line = section_facts(name, out)
            elif event["kind"] == "case":
                out["cases"].append(event["case"])
                line = case_line(event["case"])
            else:  # "done"
                out.update({k: v for k, v in event.items() if k in ("status", "error", "traceback")})
                write(results)
                return event["status"]
            write(results)  # saved before it is printed: a line on the screen is always in the files
            say(f"[device_check] {name}{' / ' if event['kind'] == 'case' else ': '}{line}")
        if not alive:
            return "crashed"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for all sections together (default 420); sections that do not fit are skipped")
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here (after every result)")
    parser.add_argument("--markdown", type=pathlib.Path, help="write a BENCHMARKS.md-style block here")
    parser.add_argument("--sections", default=",".join(ORDER),
                        help="comma list of sections to run (devices always runs), e.g. a retry of those that failed")
    parser.add_argument("--attention", default="auto", choices=("auto", "cudnn", "flash", "xla"),
                        help="attention of each model case's first attempt (default auto; a failed attempt is retried "
                             "with flash; cudnn on a CPU makes every first attempt fail: the fallback's test)")
    parser.add_argument("--remat", default="full", help="remat policy of the training sections (default full)")
    parser.add_argument("--spec-tflops", type=float, default=None,
                        help="the device's dense bf16 TFLOP/s by specification, for MFU (default: the table in "
                             "train/metrics.py, e.g. 989 for H100 / H200 SXM)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and CPU expectations (CI)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(ORDER))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(ORDER)}")
    command = "python -m llavaction_jax.bench.device_check " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(results):
        for path, text in ((args.out, lambda: json.dumps(results, indent=1, default=str)),
                           (args.markdown, lambda: markdown_block(results, command.strip()))):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                partial.write_text(text() + "\n")
                partial.replace(path)  # a reader (or a kill) never sees half a file

    results = run_checks(SIZES["smoke" if args.smoke else "full"], args.budget, write, sections, args.attention,
                         args.remat, args.spec_tflops)
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
