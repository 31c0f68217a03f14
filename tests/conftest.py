"""Test setup: 8 fake CPU devices, no hub access, absl flags parsed (Grain workers need them)."""

import os
import shutil
import tempfile

# 8 fake CPU devices. XLA:CPU runs every device's program, and the parts each device's thunk executor splits off,
# on one thread pool of max(PJRT_NPROC or cores, devices) threads: 8 here. A collective blocks its thread until all
# participants arrive, and a device's independent collectives are unordered, so under load all 8 threads could end
# up blocked in collectives whose missing participants sat in the pool's queue: a deadlock at 0% CPU
# (docs/testing.md has the evidence). PJRT_NPROC=64 leaves threads for them. Eigen intra-op parallelism stays off
# (2 cores). A collective still stuck after 300 s aborts its process with XLA's message naming it (a warning at
# 30 s), and the watchdog (tests/_watchdog.py) bounds every multi-device / multi-process test anyway.
# Subprocess tests pass the same flags via COLLECTIVE_FLAGS and inherit PJRT_NPROC from the environment.
COLLECTIVE_FLAGS = ("--xla_cpu_multi_thread_eigen=false --xla_cpu_collective_call_warn_stuck_timeout_seconds=30 "
                    "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=300")
import _watchdog  # (no jax there) FAST_COMPILE_FLAG: LLVM level 0 and the older fusion emitters, and why

os.environ.setdefault("XLA_FLAGS",
                      f"--xla_force_host_platform_device_count=8 {COLLECTIVE_FLAGS} {_watchdog.FAST_COMPILE_FLAG}")
os.environ.setdefault("PJRT_NPROC", "64")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run: the main process, the watchdog's child sessions and every
# JAX process a test starts (they inherit the environment) load a program compiled earlier in the run instead of
# compiling it again; the tiny model's programs recur across files and processes. A fresh directory per run (removed
# at its end), so every run compiles what it runs at least once; JAX_COMPILATION_CACHE_DIR set beforehand wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE = tempfile.mkdtemp(prefix="llavaction-test-xla-cache-")
else:
    _RUN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # a cache read costs ~10 ms

import pathlib

import jax
import pytest
from absl import flags

import _cli_e2e
from _cli_e2e import pytest_fixture_setup, pytest_runtest_call  # noqa: F401 (the cli_e2e register's hooks)

jax.config.update("jax_default_matmul_precision", "highest")
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    _watchdog.configure(config)  # @pytest.mark.watchdog(seconds): run in a child process with a deadline
    _cli_e2e.configure(config)  # @pytest.mark.cli_e2e(command): runs it end to end through the CLI


# The longest files, longest first (measured: docs/testing.md). `make test` runs the suite on every core, one file per
# worker at a time (pytest-xdist, --dist loadfile, so module fixtures are built once); a long file started last would
# run alone at the end, so these start first.
LONGEST_FIRST = ("test_demo.py", "test_mqa_eval.py", "test_aot.py", "test_train_multiprocess.py", "test_train_step.py",
                 "test_train_recovery.py", "test_device_check.py", "test_train_loop.py", "test_benchmarks.py",
                 "test_variable_frames.py", "test_ek100_eval.py", "test_convert_streaming.py")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than cores (the tests wait on child processes, signals and files part of their
    time, which a third worker fills on 2 cores), at most `--maxprocesses`."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
EK100_DIR = SHARED / "data" / "epic-kitchens-100-annotations"


@pytest.fixture
def ek100_dir():
    """The real EPIC-KITCHENS-100 annotation CSVs in ../shared/data (never copied into the repo)."""
    if not (EK100_DIR / "EPIC_100_validation.csv").exists():
        pytest.skip(f"real EK100 annotations not found at {EK100_DIR}")
    return EK100_DIR
