"""Stopping a child process at a named point (llavaction_jax/pause_points.py) and acting on it there."""

import os
import signal
import subprocess
import time

from llavaction_jax.pause_points import ENV


def pause_env(env: dict, points: str) -> dict:
    """`env` for a child that stops itself at `points` (comma-separated names, or name:detail)."""
    return dict(env, **{ENV: points})


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 600) -> None:
    """Block until `proc` stops itself at a pause point (os.waitpid with WUNTRACED, so no files are polled)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:  # it exited instead of stopping
            proc.returncode = os.waitstatus_to_exitcode(status)
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the process exited with {proc.returncode} instead of pausing:\n{out}")
        if time.monotonic() > deadline:
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
        proc.wait(timeout=60)
