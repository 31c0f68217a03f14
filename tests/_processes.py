"""Helpers for tests that start real processes: a coordinator port no other process can take, and a process with
its output in a log file (stopping a process at a named point: tests/_pause.py).

Nothing here has a timeout of its own: the tests that use them are marked `watchdog` (tests/_watchdog.py), which
bounds the whole test.
"""

import contextlib
import pathlib
import socket
import subprocess


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


def run_logged(args, log: pathlib.Path, **kwargs) -> subprocess.Popen:
    """Popen with stdout and stderr into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
