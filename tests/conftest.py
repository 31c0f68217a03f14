"""Test setup: 8 fake CPU devices, no hub access, absl flags parsed (Grain workers need them)."""

import os

# 8 fake CPU devices. XLA:CPU runs the per-device programs, and the independent thunks each device's executor
# splits off, on one Eigen thread pool of max(cores, devices) threads (8 here); a collective blocks its thread until
# every participant arrives. Under load the 8 threads can all end up blocked in collectives whose missing
# participants wait in the pool's queue: a deadlock (docs/testing.md). PJRT_NPROC sizes that pool, so it is raised
# well above what 8 devices can block at once. The Eigen intra-op parallelism stays off (one deterministic order,
# no oversubscription of 2 cores). A collective still stuck after 180 s aborts the process with XLA's message
# naming it (it warns at 30 s); the per-test watchdog (tests/_watchdog.py) bounds every multi-device test anyway.
# Subprocess tests pass the same flags via COLLECTIVE_FLAGS and inherit PJRT_NPROC from the environment.
COLLECTIVE_FLAGS = ("--xla_cpu_multi_thread_eigen=false --xla_cpu_collective_call_warn_stuck_timeout_seconds=30 "
                    "--xla_cpu_collective_call_terminate_timeout_seconds=180 --xla_cpu_collective_timeout_seconds=180")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + COLLECTIVE_FLAGS)
os.environ.setdefault("PJRT_NPROC", "64")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest
from absl import flags

import _watchdog

jax.config.update("jax_default_matmul_precision", "highest")
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    _watchdog.configure(config)  # @pytest.mark.watchdog(seconds): run in a child process with a deadline


SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
EK100_DIR = SHARED / "data" / "epic-kitchens-100-annotations"


@pytest.fixture
def ek100_dir():
    """The real EPIC-KITCHENS-100 annotation CSVs in ../shared/data (never copied into the repo)."""
    if not (EK100_DIR / "EPIC_100_validation.csv").exists():
        pytest.skip(f"real EK100 annotations not found at {EK100_DIR}")
    return EK100_DIR
