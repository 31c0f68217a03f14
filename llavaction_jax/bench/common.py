"""Shared benchmark plumbing: timing, machine description, and appending results to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import time
from typing import Callable

import jax

BENCHMARKS_MD = pathlib.Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def time_calls(fn: Callable[[], object], repeats: int, block: Callable[[object], object] = lambda x: x) -> list[float]:
    """Wall seconds of `repeats` calls of fn (each result passed through `block` to wait for async work)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} on {kind}"


def record(title: str, command: str, lines: list[str], write: bool = True, machine_text: str | None = None) -> str:
    """Print a result block and append it to BENCHMARKS.md (newest last). `machine_text` describes the machine
    where this process did not measure (the device check's worker did); default: this process's devices."""
    today = datetime.date.today().isoformat()
    block = "\n".join([f"### {title} ({today})", "", f"- command: `{command}`", f"- machine: {machine_text or machine()}",
                        *lines, ""])
    print(block)
    if write:
        with BENCHMARKS_MD.open("a") as f:
            f.write("\n" + block)
    return block
