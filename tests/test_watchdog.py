"""The per-test watchdog (tests/_watchdog.py): a marked test that blocks for good is killed and failed alone, with
a clear message, within its deadline; the marked tests after it still run, and its worker processes die too. A
marker's `devices=N` gives its child N fake CPU devices."""

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import _watchdog

TESTS = pathlib.Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import _watchdog

def pytest_configure(config):
    _watchdog.configure(config)
"""

INNER = """
import os, subprocess, sys, time
import pytest

@pytest.fixture(scope="module")
def shared():
    return {"builds": 1}

@pytest.mark.watchdog(3)
def test_before(shared):
    assert shared["builds"] == 1

@pytest.mark.watchdog(6)
def test_blocks_forever(tmp_path):
    # a real blocked process: a worker that never exits, waited on without a timeout, then a read that never returns
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(os.environ["WORKER_PID_FILE"], "w") as f:
        f.write(str(worker.pid))
    worker.wait()

@pytest.mark.watchdog(30)
def test_after_the_hang_still_runs(shared):
    assert shared["builds"] == 1

@pytest.mark.watchdog(30)
def test_a_failure_is_reported_as_usual():
    assert 1 + 1 == 3, "plain failure"

@pytest.mark.watchdog(30)
def test_a_skip_is_reported_as_usual():
    pytest.skip("skipped on purpose")

def test_unmarked_runs_in_process():
    assert "LLAVACTION_WATCHDOG_CHILD" not in os.environ

@pytest.mark.watchdog(30)
def test_marked_runs_in_a_child():
    assert "LLAVACTION_WATCHDOG_CHILD" in os.environ

@pytest.mark.watchdog(30, devices=2)
def test_marked_with_devices_runs_in_a_child_with_that_many():
    flags = os.environ["XLA_FLAGS"].split()
    assert "LLAVACTION_WATCHDOG_CHILD" in os.environ
    assert [f for f in flags if "device_count" in f] == ["--xla_force_host_platform_device_count=2"], flags
    assert flags[1:] == os.environ["OUTER_XLA_FLAGS"].split()[1:]  # the other flags kept

@pytest.mark.watchdog(30, devices=1, fast_compile=False)
def test_marked_for_the_default_compile_runs_without_the_fast_flag():
    flags = os.environ["XLA_FLAGS"].split()
    outer = os.environ["OUTER_XLA_FLAGS"].split()
    fast = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
    assert set(fast) <= set(outer) and not set(fast) & set(flags)
    assert flags == ["--xla_force_host_platform_device_count=1", *[f for f in outer[1:] if f not in fast]]
    assert os.environ["PJRT_NPROC"] == "1"  # one device: XLA on one thread
"""


def test_a_hanging_test_is_killed_and_failed_alone_within_its_deadline(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pid_file = tmp_path / "worker.pid"
    env = {k: v for k, v in os.environ.items() if k not in (_watchdog.CHILD_ENV, "LLAVACTION_TEST_TIMEOUT_SCALE",
                                                              "LLAVACTION_WATCHDOG")}
    env["WORKER_PID_FILE"] = str(pid_file)
    env["XLA_FLAGS"] = env["OUTER_XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                                                 "--xla_cpu_multi_thread_eigen=false "
                                                 "--xla_backend_optimization_level=0 "
                                                 "--xla_cpu_use_fusion_emitters=false")
    env["PJRT_NPROC"] = "64"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    log = out.stdout + out.stderr
    assert out.returncode == 1, log
    assert "WATCHDOG: test_inner.py::test_blocks_forever did not finish within 6 s" in log, log
    assert "its process group was killed" in log, log
    assert "in test_blocks_forever" in log and "in wait" in log, log  # faulthandler: the stuck stack, before the kill
    for passed in ("test_before", "test_after_the_hang_still_runs", "test_unmarked_runs_in_process",
                   "test_marked_runs_in_a_child", "test_marked_with_devices_runs_in_a_child_with_that_many",
                   "test_marked_for_the_default_compile_runs_without_the_fast_flag"):
        assert f"PASSED test_inner.py::{passed}" in log, log
    assert "FAILED test_inner.py::test_a_failure_is_reported_as_usual" in log and "plain failure" in log, log
    assert "SKIPPED" in log and "skipped on purpose" in log, log
    assert "2 failed, 6 passed, 1 skipped" in log, log
    # the deadline is 6 s; child start-ups (four of them) and the rest take some seconds on a loaded machine
    assert elapsed < 120, elapsed
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker), "the hung test's worker process survived the watchdog"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie (killed, not yet reaped by init) counts as dead
    except FileNotFoundError:
        return False
