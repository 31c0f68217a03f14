"""One run per output at a time: an exclusive lock beside every output a command writes.

`train` (its run directory), `eval`, `eval-suite`, `predict`, `extract-frames` and `convert` (their `--out`) hold
the lock file `.NAME.lock` next to the output `NAME` while they run. A second run on the same output is refused at
once, in one line naming the holder (command, host, pid, start time and the lock file). The file is a JSON record
{host, machine, pid, pid_start, started, command, token}, created with O_EXCL (atomic on local filesystems and
NFS), and removed when the run ends, however it ends in Python (also on errors).

A lock left behind by a run that was killed is recognised as stale and replaced, with a note:
- same machine (same kernel boot and pid namespace, `machine`): its pid is gone, is a zombie, or now belongs to a
  process that started at another time (pid reuse);
- another machine, whose processes cannot be seen from here: the holder touches the file every `HEARTBEAT_S`
  seconds; one that has not been touched for `STALE_AFTER_S` seconds is stale. Ages are measured on the
  filesystem's own clock (the mtime of a file created beside it), so hosts' clocks need not agree.

A multi-process run (jax.distributed) takes one lock: process 0 creates it and sends its token to the others. On a
filesystem the hosts share, they see that lock file and hold none of their own; a host that does not see it (its
own local disk) takes its own lock there, since a second run could write that disk too. Every process learns
every other's outcome, so all of them stop together with the same message instead of waiting on a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import tempfile
import threading
import uuid

import numpy as np

from llavaction_jax.pause_points import pause_point

HEARTBEAT_S = 10.0
STALE_AFTER_S = 300.0
UNREADABLE_STALE_S = 30.0  # a lock file that stays empty or torn this long was cut off while being written
_MESSAGE_BYTES = 2048


class LockHeld(RuntimeError):
    """The output is in use by another run (or its lock could not be taken)."""


def lock_path(output: str | os.PathLike) -> pathlib.Path:
    output = pathlib.Path(output).absolute()
    return output.parent / f".{output.name}.lock"


def this_machine() -> str:
    """What makes pids comparable: the kernel boot and the pid namespace (containers on one host differ)."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(pathlib.Path(source).read_text().strip())
        except OSError:
            pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "/".join(parts)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None where there is no such file."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    now = process_start(pid)
    return start is None or now is None or now == start


def _fs_now(directory: pathlib.Path) -> float:
    """The filesystem's current time: the mtime of a file created now beside the lock."""
    fd, name = tempfile.mkstemp(prefix=".llavaction-clock-", dir=directory)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(name)


def _read(path: pathlib.Path) -> tuple[dict | None, os.stat_result | None]:
    try:
        stat = path.stat()
        holder = json.loads(path.read_text())
        return (holder if isinstance(holder, dict) else None), stat
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, stat


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):  # python -m llavaction_jax ...
        argv[0] = "python -m llavaction_jax"
    return " ".join(argv)


class OutputLock:
    """The lock of one output; `acquire()` raises LockHeld naming the holder, `release()` removes our file."""

    def __init__(self, output: str | os.PathLike, what: str, token: str | None = None):
        self.output = pathlib.Path(output).absolute()
        self.path = lock_path(self.output)
        self.what = what
        self.token = token or uuid.uuid4().hex  # the run's: the processes of one multi-process run share it
        self.notes: list[str] = []  # stale locks replaced
        self._inode: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def info(self) -> dict:
        return {"what": self.what, "host": socket.gethostname(), "machine": this_machine(), "pid": os.getpid(),
                "pid_start": process_start(os.getpid()), "token": self.token,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": _command()[:300]}

    def acquire(self) -> "OutputLock | None":
        """Take the lock; None when it is already held by this run (another process of it, same token)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, stat = _read(self.path)
                if stat is None:
                    continue  # released meanwhile
                if holder is not None and holder.get("token") == self.token:
                    return None
                reason = self._stale_reason(holder, stat)
                if reason is None:
                    raise LockHeld(self._held_message(holder, stat)) from None
                if self._break(stat):
                    self.notes.append(f"replaced the stale lock {self.path} ({reason})")
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info()) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._inode = self.path.stat().st_ino
            self._heartbeat = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
            self._heartbeat.start()
            return self
        raise LockHeld(f"{self.path}: the lock kept changing while it was taken; is another run starting on "
                       f"{self.output}?")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.path.stat().st_ino == self._inode:
                    os.utime(self.path)
            except OSError:
                pass  # a full or briefly unreachable filesystem: the next beat tries again

    def _stale_reason(self, holder: dict | None, stat: os.stat_result) -> str | None:
        """Why the lock is stale, or None when its holder may still be running."""
        age = _fs_now(self.path.parent) - stat.st_mtime
        if holder is None:
            return f"unreadable for {age:.0f} s" if age > UNREADABLE_STALE_S else None
        if holder.get("machine") == this_machine():
            pid = holder.get("pid")
            if not isinstance(pid, int) or not process_alive(pid, holder.get("pid_start")):
                return f"its process {pid} on this machine is gone"
            return None
        if age > STALE_AFTER_S:
            return f"no heartbeat from host {holder.get('host')} for {age:.0f} s"
        return None

    def _held_message(self, holder: dict | None, stat: os.stat_result) -> str:
        if holder is None:
            return (f"{self.output} is being locked by another run right now ({self.path} is still being written); "
                    "wait for that run to end or write elsewhere")
        text = (f"{self.output} is in use by another run: {holder.get('what')} on host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')} ({holder.get('command')}), lock file "
                f"{self.path}. Wait for it to end or write elsewhere")
        if holder.get("machine") != this_machine():
            text += (f"; that host's processes cannot be checked from here: if that run is gone, its lock counts as "
                     f"stale {STALE_AFTER_S:.0f} s after its last heartbeat, or delete {self.path}")
        return text

    def _break(self, stat: os.stat_result) -> bool:
        """Remove the stale lock file we judged (and only it: a lock created meanwhile is put back)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_ino != stat.st_ino:  # a new holder replaced it between our read and the rename
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink()
            return False
        aside.unlink()
        return True


# ----------------------------------------------------------------------------------------- one lock per run
def _processes() -> tuple[int, int]:
    """(index, count) of this process in a jax.distributed run; (0, 1) when JAX is not in use."""
    if "jax" not in sys.modules:
        return 0, 1
    import jax  # already loaded (checked above); locks.py loads no JAX itself (extract-frames runs without it)

    return jax.process_index(), jax.process_count()


def allgather_text(text: str) -> list[str]:
    from jax.experimental import multihost_utils  # multi-process runs only: locks.py loads no JAX itself

    raw = text.encode()[:_MESSAGE_BYTES]
    buffer = np.zeros(_MESSAGE_BYTES + 4, np.uint8)
    buffer[:4] = np.frombuffer(np.int32(len(raw)).tobytes(), np.uint8)
    buffer[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _MESSAGE_BYTES + 4)
    return [bytes(r[4:4 + int(np.frombuffer(r[:4].tobytes(), np.int32)[0])]).decode(errors="replace") for r in rows]


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, what: str, log=None):
    """Hold the lock of `output` for the duration of the block (see the module docstring for several processes).
    Raises LockHeld (every process, same message) when another run holds it; `log` gets the stale-lock notes."""
    index, count = _processes()
    token = uuid.uuid4().hex
    if count > 1:
        token = allgather_text(token)[0]  # process 0's: the run's token
    lock, error = None, ""

    def take() -> None:
        nonlocal lock, error
        try:
            lock = OutputLock(output, what, token).acquire()
        except (LockHeld, OSError) as e:
            error = str(e)

    if index == 0:
        take()
    if count > 1:
        first = allgather_text(error)[0]  # process 0's outcome, once its lock file exists
        if index > 0:
            if first:
                error = first
            else:  # sees process 0's lock on a shared filesystem (same token: none of its own), else takes its own
                take()
        errors = [e for e in allgather_text(error) if e]
        error = errors[0] if errors else ""
    if error:
        if lock is not None:
            lock.release()
        raise LockHeld(error)
    if lock is not None and log is not None:
        for note in lock.notes:
            log(f"note: {note}")
    pause_point("output-locked")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
