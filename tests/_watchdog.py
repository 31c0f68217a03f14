"""Per-test watchdog: tests marked `@pytest.mark.watchdog(seconds)` run in a child pytest process with a deadline.

Multi-device (fake CPU devices) and multi-process tests can block forever inside C++ (a collective whose peers
never arrive, a worker waiting on a dead peer), where no Python-level timeout can interrupt them. So the main
pytest process never runs such a test itself: it starts `python -m pytest <node ids>` in a new session (process
group), follows the child's per-test progress in a JSON-lines file, and when one test runs past its deadline it
kills the whole group (the child and every worker process it started), reports that test as failed with a clear
message, and starts a fresh child for the marked tests that had not run yet. Other tests are not affected.

Marked tests of one module share a child, so module-scoped fixtures are built once per child, as in-process.
The deadline of a test counts from its start (setup included: a module fixture built for it counts towards it).
`@pytest.mark.watchdog(seconds, devices=1)` gives the child that many fake CPU devices instead of the suite's 8
(tests whose claim is not about sharding compile and run far cheaper on one); the marked tests of a module that
ask for different counts run in one child per count. `fast_compile=False` compiles the child's programs at XLA's
default optimisation level (a module whose programs execute more than they compile: eval decode loops).

Environment:
  LLAVACTION_TEST_TIMEOUT_SCALE=2   multiply every deadline (a slow or very loaded machine)
  LLAVACTION_WATCHDOG=0             run marked tests in-process, without a deadline (debugging, pdb)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest
from _pytest.reports import TestReport

# Most tests compile far more than they run (the tiny train step: 10-15 s of CPU to compile, 0.2 s to run), so the
# test processes and the compile-bound processes they start compile fast: LLVM's optimisation level 0 (about half
# the compile CPU, code about 2x slower) and XLA:CPU's older loop emitters for fusions instead of its MLIR fusion
# emitters (the tiny train step then compiles in a third of the CPU again, and runs about as fast at level 0);
# results within float rounding of the default (docs/testing.md). Processes that mostly execute (the demo's 300
# steps, the eval command lines' decode loops) keep XLA's defaults: there both flags cost run time.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def without_fast_compile(xla_flags: str) -> str:
    """`xla_flags` with FAST_COMPILE_FLAG's flags removed, whatever their values: XLA's defaults there."""
    names = tuple(flag.split("=")[0] + "=" for flag in FAST_COMPILE_FLAG.split())
    return " ".join(f for f in xla_flags.split() if not f.startswith(names))


CHILD_ENV = "LLAVACTION_WATCHDOG_CHILD"  # set in the child: the progress file it writes
MESSAGE = "WATCHDOG: {nodeid} did not finish within {seconds:.0f} s"
POLL_S = 0.2
IDLE_S = 300  # collection, the gaps between tests and interpreter exit
KILL_GRACE_S = 5  # the child dumps Python stacks (faulthandler) this long before the deadline


def deadline_s(item) -> float | None:
    marker = item.get_closest_marker("watchdog")
    if marker is None:
        return None
    seconds = marker.args[0] if marker.args else marker.kwargs.get("seconds", 600)
    return float(seconds) * float(os.environ.get("LLAVACTION_TEST_TIMEOUT_SCALE", "1"))


def child_options(item) -> tuple[int | None, bool]:
    """(devices, fast_compile) of the child that runs `item`: the fake CPU device count the marker asks for
    (`devices=N`; None: the suite's, conftest.py), and False where it says `fast_compile=False`: XLA's default
    optimisation level instead of the suite's fast compile (FAST_COMPILE_FLAG), for modules that execute
    more than they compile."""
    marker = item.get_closest_marker("watchdog")
    return (None, True) if marker is None else (marker.kwargs.get("devices"), marker.kwargs.get("fast_compile", True))


def configure(config):
    config.addinivalue_line("markers", "watchdog(seconds, devices=None, fast_compile=True): run in a child pytest "
                                       "process (with `devices` fake CPU devices when given; XLA's default "
                                       "optimisation level with fast_compile=False), killed (and failed) after "
                                       "`seconds`; see tests/_watchdog.py")
    if os.environ.get(CHILD_ENV):
        config.pluginmanager.register(ChildReporter(os.environ[CHILD_ENV]), "llavaction-watchdog-child")
    elif os.environ.get("LLAVACTION_WATCHDOG", "1") != "0":
        config.pluginmanager.register(Parent(config), "llavaction-watchdog")


# ------------------------------------------------------------------------------------------------ the child


class ChildReporter:
    """Appends test starts and reports to the progress file; dumps stacks shortly before the deadline."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.stacks = open(path + ".stacks", "w")  # not stderr: pytest captures that, and the capture dies with us

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        seconds = deadline_s(item)
        if seconds:
            import faulthandler  # a C-level timer thread: dumps every thread's Python stack even while blocked in C++

            faulthandler.dump_traceback_later(max(1.0, seconds - KILL_GRACE_S), exit=False, file=self.stacks)

    def pytest_runtest_logstart(self, nodeid, location):
        self._write({"event": "start", "nodeid": nodeid, "time": time.time()})

    def pytest_runtest_logreport(self, report):
        longrepr = report.longrepr
        if isinstance(longrepr, tuple):  # a skip: (path, lineno, reason)
            longrepr = list(longrepr)
        elif longrepr is not None:
            longrepr = str(longrepr)
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        self._write({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                     "longrepr": longrepr, "crash": crash, "sections": list(report.sections), "duration": report.duration,
                     "wasxfail": getattr(report, "wasxfail", None)})

    def pytest_runtest_logfinish(self, nodeid, location):
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        self._write({"event": "finish", "nodeid": nodeid})


# ----------------------------------------------------------------------------------------------- the parent


class Parent:
    def __init__(self, config):
        self.config = config
        self.reports: dict[str, list[dict]] = {}  # node id -> the child's reports for it

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if deadline_s(item) is None:
            return None
        if item.nodeid not in self.reports:
            module = [i for i in item.session.items if i.path == item.path and deadline_s(i) is not None
                      and i.nodeid not in self.reports]
            self.run_children(module)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for record in self.reports.pop(item.nodeid):
            item.ihook.pytest_runtest_logreport(report=make_report(item, record))
        # Fixtures and collectors this process set up for earlier (unmarked) tests are finished here, as pytest's
        # own protocol would after the item: otherwise the next module's first test finds them still set up.
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def run_children(self, items):
        deadlines = {i.nodeid: deadline_s(i) for i in items}
        for options in dict.fromkeys(child_options(i) for i in items):  # one child per options, in test order
            pending = [i.nodeid for i in items if child_options(i) == options]
            while pending:
                for nodeid, records in run_child(self.config, pending, deadlines, *options).items():
                    self.reports[nodeid] = records
                pending = [n for n in pending if n not in self.reports]


def thread_pool_env(env: dict, devices: int) -> dict:
    """`env` for a JAX process with `devices` fake CPU devices: a one-device process has no collectives to
    deadlock on, so it runs XLA on one thread, as on a one-core machine: the suite keeps both cores busy with
    several processes, where a second thread per program only adds its hand-offs and spinning (the demo's training
    step: 15-30% less CPU on one thread, docs/testing.md). The test processes keep 64 (conftest.py)."""
    if devices == 1:
        env["PJRT_NPROC"] = "1"
    return env


def run_child(config, nodeids, deadlines, devices: int | None = None,
              fast_compile: bool = True) -> dict[str, list[dict]]:
    """Runs `nodeids` in one child (with `devices` fake CPU devices, if given) until they finish, one overruns its
    deadline, or the child dies or stalls between tests. Returns the reports of the tests that ran, a failure for
    the one that hung or crashed, and always at least one entry (so the caller, which reruns the rest, makes
    progress)."""
    fd, progress = tempfile.mkstemp(prefix="watchdog-", suffix=".jsonl")
    os.close(fd)
    log = tempfile.TemporaryFile(mode="w+b")
    args = [sys.executable, "-m", "pytest", *nodeids, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "--rootdir", str(config.rootpath)]
    if config.inipath:
        args += ["-c", str(config.inipath)]
    env = dict(os.environ, **{CHILD_ENV: progress})
    if devices is not None:  # the environment's XLA flags (conftest.py's), with this device count
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {flags.strip()}".strip()
        thread_pool_env(env, devices)
    if not fast_compile:  # XLA's defaults: the suite's fast-compile flags (FAST_COMPILE_FLAG) removed
        env["XLA_FLAGS"] = without_fast_compile(env.get("XLA_FLAGS", ""))
    proc = subprocess.Popen(args, cwd=str(config.rootpath), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    results: dict[str, list[dict]] = {}
    current, since, offset, buffer = None, time.monotonic(), 0, ""
    idle_limit = IDLE_S * float(os.environ.get("LLAVACTION_TEST_TIMEOUT_SCALE", "1"))

    def next_unstarted():
        return next((n for n in nodeids if n not in results), None)

    try:
        while True:
            rc = proc.poll()
            with open(progress) as f:  # new complete lines of the progress file
                f.seek(offset)
                buffer += f.read()
                offset = f.tell()
            *lines, buffer = buffer.split("\n")
            for line in lines:
                record = json.loads(line)
                if record["event"] == "start":
                    current, since = record["nodeid"], time.monotonic()
                    results[current] = []
                elif record["event"] == "report":
                    results.setdefault(record["nodeid"], []).append(record)
                else:
                    current, since = None, time.monotonic()
            waited = time.monotonic() - since
            if current is not None and waited > deadlines[current]:
                kill_group(proc)
                message = (MESSAGE.format(nodeid=current, seconds=deadlines[current]) + "; its process group was "
                           "killed (a deadlocked collective or a hung worker process?). The other tests go on in a "
                           "fresh process.")
                results[current] = [failure(current, message, log, stacks=read_stacks(progress))]
                return results
            if rc is not None:
                if current is not None:
                    results[current] = [failure(current, f"WATCHDOG: the child process running {current} died "
                                                         f"(exit status {rc}) before the test finished.", log)]
                elif not results and next_unstarted() is not None:  # no progress at all: collection error, say
                    nodeid = next_unstarted()
                    results[nodeid] = [failure(nodeid, f"WATCHDOG: the child pytest exited (status {rc}) "
                                                       "before this test started.", log)]
                return results
            if current is None and waited > idle_limit:  # stalled in collection, between tests or at exit
                kill_group(proc)
                nodeid = next_unstarted()
                if nodeid is not None:
                    results[nodeid] = [failure(nodeid, f"WATCHDOG: the child pytest stalled {idle_limit:.0f} s "
                                                       "before this test started; killed.", log)]
                return results
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        log.close()
        for path in (progress, progress + ".stacks"):
            if os.path.exists(path):
                os.unlink(path)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child pytest and every process it started (same session)
    except ProcessLookupError:
        pass
    proc.wait()


def output_tail(log, limit=6000) -> str:
    log.flush()
    log.seek(0, os.SEEK_END)
    size = log.tell()
    log.seek(max(0, size - limit))
    return log.read().decode(errors="replace")


def read_stacks(progress) -> str:
    try:
        with open(progress + ".stacks") as f:
            return f.read()[-20000:]
    except FileNotFoundError:
        return ""


def failure(nodeid, message, log, when="call", stacks="") -> dict:
    text = message
    if stacks:
        text += f"\n\n---- Python stacks of the child shortly before the kill (faulthandler) ----\n{stacks}"
    text += f"\n\n---- last output of the child process ----\n{output_tail(log)}"
    return {"event": "report", "nodeid": nodeid, "when": when, "outcome": "failed", "duration": 0.0,
            "longrepr": text, "crash": message, "sections": [], "wasxfail": None}


class ChildRepr:
    """A failure's text from the child; `reprcrash.message` feeds pytest's one-line summary."""

    def __init__(self, text: str, crash: str | None):
        self.text = text
        self.reprcrash = None if crash is None else types.SimpleNamespace(message=crash, path="", lineno=0)

    def toterminal(self, tw):
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self):
        return self.text


def make_report(item, record) -> TestReport:
    longrepr = record["longrepr"]
    if isinstance(longrepr, list):
        longrepr = tuple(longrepr)
    elif isinstance(longrepr, str):
        longrepr = ChildRepr(longrepr, record.get("crash"))
    extra = {"wasxfail": record["wasxfail"]} if record.get("wasxfail") is not None else {}
    return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, record["outcome"], longrepr,
                      record["when"], sections=[tuple(s) for s in record["sections"]], duration=record["duration"],
                      **extra)
