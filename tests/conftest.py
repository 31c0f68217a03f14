"""Test setup: 8 fake CPU devices, no hub access, absl flags parsed (Grain workers need them)."""

import os

# 8 fake devices on 2 cores. XLA:CPU's thunk executor runs independent collectives concurrently, in an order that
# can differ between devices (seen: 6 devices in an all-reduce, 2 in an all-gather of the same train step: a
# deadlock). Without the Eigen intra-op pool it runs them in one deterministic order. A collective can also wait
# long for its threads under load, so the termination timeout (which aborts the process) is raised.
# Subprocess tests pass the same flags via COLLECTIVE_FLAGS.
COLLECTIVE_FLAGS = ("--xla_cpu_multi_thread_eigen=false --xla_cpu_collective_call_terminate_timeout_seconds=900 "
                    "--xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + COLLECTIVE_FLAGS)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest
from absl import flags

jax.config.update("jax_default_matmul_precision", "highest")
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
EK100_DIR = SHARED / "data" / "epic-kitchens-100-annotations"


@pytest.fixture
def ek100_dir():
    """The real EPIC-KITCHENS-100 annotation CSVs in ../shared/data (never copied into the repo)."""
    if not (EK100_DIR / "EPIC_100_validation.csv").exists():
        pytest.skip(f"real EK100 annotations not found at {EK100_DIR}")
    return EK100_DIR
