"""Named points where a process can be held for a test that interrupts it there; inert unless asked for.

Tests of interrupted runs (a SIGKILL during the final model save, an eval killed after its first step) need the
process stopped at a known place. Watching its files from outside races the process: on a loaded machine it can
pass the window between two looks. So the process holds itself instead, when its environment says

    LLAVACTION_TEST_PAUSE_AT=<point>          the name passed to `pause_at` below
    LLAVACTION_TEST_PAUSE_MARKER=<file>       written (with the process id) once the point is reached

On reaching that point it writes the marker file and sleeps until it is killed; the test waits for
the marker, then sends its signal. Without the variable (every real run), `pause_at` returns at once.

Points: `model-save` (checkpoint_io.save_model: the params are written, the config and checksums not yet),
`eval-step-written` (eval/runner.py: a step's predictions are on disk in the partial file).
"""

from __future__ import annotations

import os
import time

POINT_ENV = "LLAVACTION_TEST_PAUSE_AT"
MARKER_ENV = "LLAVACTION_TEST_PAUSE_MARKER"


def pause_at(point: str) -> None:
    """Hold the process here (forever) when LLAVACTION_TEST_PAUSE_AT names `point`; otherwise return."""
    if os.environ.get(POINT_ENV) != point:
        return
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        raise RuntimeError(f"{POINT_ENV}={point} needs {MARKER_ENV}=<file> to say when the point is reached")
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {point}\n")
    os.replace(tmp, marker)  # the marker appears whole
    while True:
        time.sleep(3600)
