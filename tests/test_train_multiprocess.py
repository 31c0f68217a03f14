"""Two JAX processes x 4 CPU devices (real jax.distributed, gloo) train 3 steps and match one 8-device process."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from _processes import reserved_port
from _train_fixtures import make_training_data, tiny_train_config
from _watchdog import FAST_COMPILE_FLAG
from conftest import COLLECTIVE_FLAGS
from llavaction_jax.train.loop import train

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.watchdog(1200)  # 2 processes: a child process group with a deadline (tests/_watchdog.py)

WORKER = r"""
import sys, json, pathlib
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[5])
from absl import flags
flags.FLAGS.mark_as_parsed()
from _train_fixtures import tiny_train_config
from llavaction_jax.train.loop import train
cfg = tiny_train_config(pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4]), steps=3, **{"train.save_model": False})
summary = train(cfg)
print("LOSSES", json.dumps(summary["losses"]), flush=True)
"""


def test_two_processes_train_like_one(tmp_path):
    data = make_training_data(tmp_path / "data")
    single = train(tiny_train_config(data, tmp_path / "single", steps=3, **{"train.save_model": False}))

    flags = f"--xla_force_host_platform_device_count=4 {COLLECTIVE_FLAGS} {FAST_COMPILE_FLAG}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    with reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(data),
                                   str(tmp_path / "multi"), str(REPO / "tests")], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outputs = [p.communicate()[0] for p in procs]  # bounded by the watchdog
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    losses = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines() if line.startswith("LOSSES")]
    assert len(losses) == 2 and losses[0] == losses[1]
    np.testing.assert_allclose(losses[0], single["losses"], rtol=1e-5)

    import orbax.checkpoint as ocp

    def final(path, target=None):
        mngr = ocp.CheckpointManager(path / "checkpoints")
        return mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    single_state = final(tmp_path / "single")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the 2-process checkpoint, read by one process
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), single_state)
    multi_state = final(tmp_path / "multi", target)
    for a, b in zip(jax.tree.leaves(single_state["params"]), jax.tree.leaves(multi_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
