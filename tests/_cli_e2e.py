"""End-to-end runs of the commands through the command-line entry point, and the register checked against `--help`.

A test that runs a command end to end is marked `@pytest.mark.cli_e2e("eval")` (a command with sub-commands names
both words: `cli_e2e("convert to-torch")`) and runs it with `run_cli(argv)` (llavaction_jax.cli.main in this
process) or `run_cli_child([argv, ...])` (the same in a child process with one device). A marked test fails unless,
by the end of its body, every command it names ran with exit status 0, doing real work (not --help, --version,
--print-config, --check or --table-only), in the test itself or while a fixture it uses was set up. So the marker
cannot be earned by a test that only asks for help, nor by another test's run. tests/test_cli_e2e.py checks that
every command `python -m llavaction_jax --help` lists has a marked test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from _watchdog import FAST_COMPILE_FLAG, thread_pool_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NESTED = ("convert", "build-bench")  # commands whose first argument is a sub-command
NOT_WORK = ("-h", "--help", "--version", "--print-config", "--check", "--table-only")


@dataclasses.dataclass(frozen=True)
class Run:
    command: str
    argv: tuple[str, ...]
    code: int
    owner: tuple[str, str]  # ("test", nodeid) or ("fixture", name)


RUNS: list[Run] = []
_CURRENT = {"test": None, "fixtures": []}


def command_of(argv) -> str:
    return " ".join(argv[:2]) if argv and argv[0] in NESTED and len(argv) > 1 else (argv[0] if argv else "")


def _record(argv, code: int) -> None:
    owner = (("fixture", _CURRENT["fixtures"][-1]) if _CURRENT["fixtures"] else ("test", _CURRENT["test"] or ""))
    RUNS.append(Run(command_of(argv), tuple(argv), int(code), owner))


def run_cli(argv: list[str]) -> int:
    """`llavaction_jax.cli.main(argv)` in this process, recorded; a usage error's SystemExit becomes its code."""
    from llavaction_jax.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    _record(argv, code)
    return code


def run_cli_child(commands: list[list[str]], devices: int = 1, timeout: float = 900,
                  without_torch: bool = False, cwd: str | os.PathLike = REPO,
                  fast_compile: bool = True) -> tuple[list[int], str]:
    """Run each argv through llavaction_jax.cli.main, in order, in one child process with `devices` CPU devices
    (`without_torch`: where `import torch` fails, as in an install without PyTorch) working in `cwd` (relative paths
    of the commands are read there); returns the exit codes and the child's output (stdout + stderr). Every run is
    recorded. `fast_compile`: the suite's fast compile, as the test processes (_watchdog.FAST_COMPILE_FLAG); False
    for a run that executes more than it compiles."""
    code = ("import json, sys\n" + ("sys.modules['torch'] = None\n" if without_torch else "") +
            "from llavaction_jax.cli import main\ncodes = []\nfor argv in json.loads(sys.argv[1]):\n"
            "    try:\n        codes.append(main(argv))\n    except SystemExit as e:\n"
            "        codes.append(e.code if isinstance(e.code, int) else 1)\n"
            "print('EXIT CODES', json.dumps(codes), flush=True)")
    flags = f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE_FLAG}" if fast_compile else "")
    env = thread_pool_env(dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), devices)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "EXIT CODES" in proc.stdout, output
    codes = json.loads(proc.stdout.split("EXIT CODES", 1)[1].splitlines()[0])
    for argv, c in zip(commands, codes):
        _record(argv, c)
    return codes, output


def configure(config) -> None:
    config.addinivalue_line("markers", "cli_e2e(*commands): the test runs these commands end to end through the "
                                       "command-line entry point (tests/_cli_e2e.py)")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _CURRENT["fixtures"].append(fixturedef.argname)
    try:
        return (yield)
    finally:
        _CURRENT["fixtures"].pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _CURRENT["test"] = item.nodeid
    try:
        result = yield  # the test's own failure propagates from here
    finally:
        _CURRENT["test"] = None
    marker = item.get_closest_marker("cli_e2e")
    if marker is not None:
        missing = [c for c in marker.args if not _ran(c, item)]
        if missing:
            raise AssertionError(f"marked cli_e2e but did not run {missing} end to end through llavaction_jax.cli.main "
                                 "(exit 0, real work) in the test or its fixtures: use run_cli / run_cli_child")
    return result


def _ran(command: str, item) -> bool:
    for run in RUNS:
        mine = run.owner == ("test", item.nodeid) or (run.owner[0] == "fixture" and run.owner[1] in item.fixturenames)
        if mine and run.command == command and run.code == 0 and not set(run.argv) & set(NOT_WORK):
            return True
    return False
