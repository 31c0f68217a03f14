"""Progress with an ETA on long work (eval, extract-frames, build-mqa).

`eta(done, total, rate)` is the "ETA h:mm:ss" the commands' progress lines end with. `Progress` counts items: on a
terminal it is a tqdm bar; otherwise (a log file, a pipe, a batch job) it prints plain lines, after the first item
and then at most every `every_s` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def eta(done: int, total: int, rate: float | None) -> str:
    """"ETA 1:23" for `total - done` items at `rate` items per second ("ETA ?" without a rate)."""
    if done >= total:
        return "ETA 0:00"
    if not rate or rate <= 0:
        return "ETA ?"
    return f"ETA {tqdm.format_interval((total - done) / rate)}"


class Progress:
    """`update()` once per item of `total`; `close()` at the end (prints the last line)."""

    def __init__(self, total: int, prefix: str, unit: str, every_s: float = 10.0, file=None):
        self.total, self.prefix, self.unit, self.every_s = total, prefix, unit, every_s
        self.file = file or sys.stderr
        self.done, self.started, self.last = 0, time.perf_counter(), None
        is_tty = getattr(self.file, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=prefix, unit=f" {unit}", file=self.file) if is_tty else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.last is None or now - self.last >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        print(f"{self.prefix} {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
              f"{eta(self.done, self.total, rate)}", file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last is None or self.done != self.total or time.perf_counter() - self.last > 0:
            self._line(time.perf_counter())
