"""Named points where a process can be made to stop itself, so a test can act at an exact moment (send SIGKILL or
SIGTERM, flip bytes, start a second run) instead of polling for files and racing the process.

`pause_point(name, detail)` does nothing unless the environment variable ``LLAVACTION_PAUSE_AT`` lists the point:
a comma-separated list of ``name`` (every time the point is reached) or ``name:detail`` (only with that detail,
e.g. a step number). A listed point prints ``paused at NAME[:DETAIL]`` to stderr and stops the process with
SIGSTOP; the parent sees the stop with ``os.waitpid(pid, os.WUNTRACED)`` and resumes it with SIGCONT (a signal
sent while it is stopped is delivered on SIGCONT). SIGSTOP stops every thread, so a point may sit in a background
thread too.

Points: ``output-locked`` (an output directory's lock was taken), ``checkpoint-saved:STEP`` (an async save is
complete, its checksums not yet written), ``checkpoint-sealed:STEP`` (they are), ``model-params-written`` (the
final model's arrays are on disk, its config and checksums not yet), ``eval-step-written:STEP`` (an eval step's
answers are flushed to this process's partial predictions file; STEP counts from 0).
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "LLAVACTION_PAUSE_AT"


def pause_point(name: str, detail: object = None) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    here = name if detail is None else f"{name}:{detail}"
    if not {name, here} & {w.strip() for w in wanted.split(",")}:
        return
    print(f"paused at {here}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
