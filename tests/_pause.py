"""Stopping a child process at a named point (llavaction_jax/pause_points.py) and acting on it there.

The waits have no deadline unless given one: the tests that start such processes are marked `watchdog`
(tests/_watchdog.py), which bounds the whole test and kills its process group; an unmarked test passes `timeout`.
"""

import os
import pathlib
import signal
import subprocess
import time

from llavaction_jax.pause_points import ENV


def pause_env(env: dict, points: str) -> dict:
    """`env` for a child that stops itself at `points` (comma-separated names, or name:detail)."""
    return dict(env, **{ENV: points})


def _output(proc: subprocess.Popen, log: pathlib.Path | None) -> str:
    if log is not None:
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""
    return proc.stdout.read()[-4000:] if proc.stdout else ""


def wait_until_stopped(proc: subprocess.Popen, log: pathlib.Path | None = None, timeout: float | None = None) -> None:
    """Block until `proc` stops itself at a pause point (os.waitpid with WUNTRACED, so no files are polled); fail,
    with its output (from `log` when it writes there, else its stdout pipe), if it exits instead."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:  # it exited instead of stopping
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise AssertionError(f"the process exited with {proc.returncode} instead of pausing:\n"
                                 f"{_output(proc, log)}")
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process did not reach its pause point")
        time.sleep(0.05)


def resume(proc: subprocess.Popen, *signals: int) -> None:
    """Send `signals` (delivered when it runs again), then let the stopped process continue."""
    for sig in signals:
        proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)


def kill(proc: subprocess.Popen) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def kill_when_stopped(proc: subprocess.Popen, log: pathlib.Path | None = None) -> None:
    """SIGKILL `proc` at its pause point: it dies there, before the next instruction after the point."""
    try:
        wait_until_stopped(proc, log)
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
