"""Reproduces the 8-fake-device collective deadlock (docs/testing.md): compiles the step of
test_train_step.py::test_8_device_mesh_gives_the_same_steps_as_one_device once, then runs it N times, one line per
execution. Not a test (no test_ prefix). Run beside some CPU load, e.g. `python -c 'while True: pass' &`:

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false \
    --xla_cpu_collective_call_terminate_timeout_seconds=60" PJRT_NPROC=8 .venv/bin/python tests/hang_repro.py 300

PJRT_NPROC=8 is the default pool for 8 devices (it hung within ~10 executions); PJRT_NPROC=64 (the tests') ran
them all. A hang ends with XLA's "Termination timeout ... exceeded" abort after the terminate timeout.
"""

import os
import pathlib
import sys
import time

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).resolve().parent)]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from llavaction_jax.model import llava  # noqa: E402
from llavaction_jax.sharding import make_mesh  # noqa: E402
from llavaction_jax.train.optim import make_optimizer, param_labels  # noqa: E402
from llavaction_jax.train.step import init_state, jit_train_step, make_train_step  # noqa: E402
from test_train_step import CFG, OPT_STABLE, make_batch  # noqa: E402


def main(n: int):
    batch = make_batch(np.random.default_rng(0))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = llava.init(CFG, jax.random.key(0))
    tx, schedules = make_optimizer(params, OPT_STABLE)
    state = init_state(params, tx)
    step = make_train_step(CFG, tx, param_labels(params, OPT_STABLE), 1, schedules, mesh)
    step = jit_train_step(step, state, batch, CFG, mesh)
    t0 = time.time()
    for i in range(n):
        state, metrics = step(state, batch)
        print(f"run {i} {time.time() - t0:.1f}s loss={float(metrics['loss']):.5f}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
