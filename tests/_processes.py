"""Helpers for tests that start real processes: a coordinator port no other process can take, and a process held
at a named point (llavaction_jax/pause_point.py) so a test can kill it exactly there.

Neither has a timeout of its own: the tests that use them are marked `watchdog` (tests/_watchdog.py), which bounds
the whole test.
"""

import contextlib
import pathlib
import socket
import subprocess
import time

from llavaction_jax.pause_point import MARKER_ENV, POINT_ENV


@contextlib.contextmanager
def reserved_port():
    """A localhost port, held for the duration of the `with`: bound here with SO_REUSEPORT (not listening), so the
    kernel gives it to no other socket, while JAX's coordinator service (gRPC, which binds with SO_REUSEPORT)
    binds and serves it. A port picked and released (bind to 0, close) can be taken by another process before
    the coordinator starts; jax.distributed cannot take port 0 (the other processes must know the port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def pause_env(env: dict, point: str, marker: pathlib.Path) -> dict:
    """`env` for a process that holds itself at `point` and writes `marker` there."""
    return dict(env, **{POINT_ENV: point, MARKER_ENV: str(marker)})


def wait_until_paused(proc: subprocess.Popen, marker: pathlib.Path, log: pathlib.Path | None = None) -> None:
    """Return once `proc` has reached its pause point (its marker exists); fail, with its output, if it exits
    before."""
    while not marker.exists():
        if proc.poll() is not None:
            output = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the process exited (status {proc.returncode}) before its pause point:\n{output}")
        time.sleep(0.05)
    assert int(marker.read_text().split()[0]) == proc.pid


def kill_paused(proc: subprocess.Popen, marker: pathlib.Path, log: pathlib.Path | None = None) -> None:
    """SIGKILL `proc` at its pause point."""
    try:
        wait_until_paused(proc, marker, log)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9


def run_logged(args, log: pathlib.Path, **kwargs) -> subprocess.Popen:
    """Popen with stdout and stderr into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
