"""One run per output: a real process holds the locks of several outputs, and every command that writes one refuses
at once in one line naming it; once the holder is SIGKILLed its locks are stale and taken over. The staleness
rules (pid gone, pid reused, another host's heartbeat) and the lock of a two-process jax.distributed run."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from _pause import kill, pause_env, wait_until_stopped
from _processes import reserved_port
from llavaction_jax import locks
from llavaction_jax.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "eval-suite", "predict", "extract-frames", "convert-from", "convert-to")

HOLDER = """
import sys
from llavaction_jax import locks
from llavaction_jax.pause_points import pause_point
held = [locks.OutputLock(path, "holder test").acquire() for path in sys.argv[1:]]
pause_point("output-locked")
"""


def command_line(name: str, out: pathlib.Path, tmp: pathlib.Path) -> list[str]:
    """Each command with an output in `out`, and inputs that get it as far as taking its lock."""
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "config.json").write_text("{}")
    (tmp / "clips.jsonl").write_text(json.dumps({"uid": "c0", "video": "v.mp4"}) + "\n")
    (tmp / "items.jsonl").write_text(json.dumps({"video": "v.mp4"}) + "\n")
    (tmp / "q.jsonl").write_text("{}\n")  # inputs exist: commands check them before taking the lock
    (tmp / "s").mkdir(exist_ok=True)
    return {
        "train": ["train", "--out", str(out), f"--config.data.samples={tmp / 'clips.jsonl'}"],
        "eval": ["eval", "--preset", "tiny", "--questions", str(tmp / "q.jsonl"), "--shards", str(tmp / "s"),
                 "--out", str(out)],
        "eval-suite": ["eval-suite", "--data", str(tmp), "--out", str(out), "--table-only"],
        "predict": ["predict", "--model", str(tmp / "model"), "--batch", str(tmp / "items.jsonl"), "--out", str(out)],
        "extract-frames": ["extract-frames", "--jsonl", str(tmp / "clips.jsonl"), "--video-root", str(tmp), "--out",
                           str(out)],
        "convert-from": ["convert", "from-torch", str(tmp / "model"), "--out", str(out)],
        "convert-to": ["convert", "to-torch", str(tmp / "model"), "--out", str(out)],
    }[name]


def test_every_command_refuses_an_output_locked_by_a_live_process_and_takes_over_once_it_is_killed(tmp_path, capsys):
    outputs = {name: tmp_path / "outputs" / f"{name}-out" for name in COMMANDS}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, outputs.values())], cwd=REPO,
                              env=pause_env(dict(os.environ, PYTHONPATH=str(REPO)), "output-locked"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_stopped(holder, timeout=120)  # this test is not under the watchdog
        for name, out in outputs.items():
            started = time.monotonic()
            assert main(command_line(name, out, tmp_path)) == 2, name
            error = capsys.readouterr().err.strip().splitlines()
            assert len(error) == 1, (name, error)
            assert f"{out} is in use by another run: holder test on host {socket.gethostname()}, pid {holder.pid}, " \
                   "started " in error[0], (name, error)
            assert f"lock file {locks.lock_path(out)}" in error[0] and time.monotonic() - started < 60
            assert not out.exists(), name  # refused before writing anything
    finally:
        kill(holder)
    # the holder is gone: its locks are stale, recognised by its pid, and the next run takes them over
    lock = locks.OutputLock(outputs["eval"], "eval")
    assert lock.acquire() is lock
    assert lock.notes == [f"replaced the stale lock {locks.lock_path(outputs['eval'])} (its process {holder.pid} on "
                          "this machine is gone)"]
    lock.release()
    assert not locks.lock_path(outputs["eval"]).exists()


def write_lock(out: pathlib.Path, **fields) -> pathlib.Path:
    info = locks.OutputLock(out, "earlier run").info()
    info.update(fields)
    path = locks.lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return path


def test_a_reused_pid_is_stale_but_a_live_one_is_not(tmp_path):
    out = tmp_path / "run"
    write_lock(out)  # this very process, alive: held
    with pytest.raises(locks.LockHeld, match=f"pid {os.getpid()}"):
        locks.OutputLock(out, "second").acquire()
    write_lock(out, pid_start="1")  # the same pid started at another time: a new process got the dead one's pid
    lock = locks.OutputLock(out, "second").acquire()
    assert "is gone" in lock.notes[0]
    lock.release()


def test_another_hosts_lock_is_held_while_its_heartbeat_is_fresh_and_stale_after(tmp_path, monkeypatch):
    out = tmp_path / "run"
    path = write_lock(out, host="node-7", machine="node-7/other-boot", pid=1234)
    with pytest.raises(locks.LockHeld) as held:
        locks.OutputLock(out, "second").acquire()
    assert "host node-7, pid 1234" in str(held.value) and "cannot be checked from here" in str(held.value)
    old = time.time() - locks.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = locks.OutputLock(out, "second").acquire()
    assert lock.notes[0].startswith(f"replaced the stale lock {path} (no heartbeat from host node-7 for ")
    lock.release()
    # a holder's heartbeat keeps its lock fresh for other hosts
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    lock = locks.OutputLock(out, "third").acquire()
    os.utime(path, (old, old))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime < old + 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 60
    lock.release()
    assert not path.exists()


def test_a_torn_lock_file_is_stale_only_once_it_is_old(tmp_path):
    out = tmp_path / "run"
    path = locks.lock_path(out)
    path.write_text("")  # killed between creating and writing it, or being written right now
    with pytest.raises(locks.LockHeld, match="being written"):
        locks.OutputLock(out, "second").acquire()
    old = time.time() - locks.UNREADABLE_STALE_S - 10
    os.utime(path, (old, old))
    lock = locks.OutputLock(out, "second").acquire()
    assert "unreadable" in lock.notes[0]
    lock.release()


TWO_PROCESSES = """
import os, sys, json
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from jax.experimental import multihost_utils
jax.config.update("jax_cpu_collectives_implementation", "gloo")
index = int(sys.argv[2])
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=index)
from llavaction_jax import locks
outs = json.loads(sys.argv[3])
for case in outs:
    out = case[index]
    try:
        with locks.output_lock(out, "two-process test") as lock:
            print(json.dumps({"case": case, "own_lock": lock is not None,
                              "exists": locks.lock_path(out).exists()}), flush=True)
            multihost_utils.sync_global_devices("both checked")
    except locks.LockHeld as e:
        print(json.dumps({"case": case, "error": str(e)}), flush=True)
"""


@pytest.mark.watchdog(300)
def test_one_lock_per_multi_process_run_on_a_shared_filesystem_each_hosts_own_otherwise(tmp_path):
    """Two jax.distributed processes: on one shared path only process 0 holds the lock; with a path each sees on
    its own disk (simulated by two folders), each holds its own; a lock held elsewhere on process 1's disk stops
    both processes with the same one-line error."""
    shared = str(tmp_path / "shared" / "out")
    own = [str(tmp_path / "host0" / "out"), str(tmp_path / "host1" / "out")]
    busy = [str(tmp_path / "host0" / "busy"), str(tmp_path / "host1" / "busy")]
    write_lock(pathlib.Path(busy[1]), pid=os.getpid())  # a live holder (this test process) on process 1's disk
    cases = [[shared, shared], own, busy]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO))
    with reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, f"127.0.0.1:{port}", str(i),
                                   json.dumps(cases)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outputs = [p.communicate() for p in procs]  # bounded by the watchdog
    assert all(p.returncode == 0 for p in procs), outputs
    results = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
    shared0, shared1 = results[0][0], results[1][0]
    assert shared0["own_lock"] and not shared1["own_lock"] and shared1["exists"]
    assert results[0][1]["own_lock"] and results[1][1]["own_lock"]
    assert results[0][2]["error"] == results[1][2]["error"]
    assert f"{busy[1]} is in use by another run: earlier run" in results[0][2]["error"]
    for path in [shared, *own, busy[0]]:
        assert not locks.lock_path(path).exists()  # released by every process that held one
