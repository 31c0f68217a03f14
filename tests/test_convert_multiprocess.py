"""Pod mode: two local processes x 4 CPU devices (real jax.distributed) convert one sharded checkpoint together.

Each process reads only the slices its devices hold; the result restores in one process and equals the
single-process conversion bit for bit. The workers are this file run as a script.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _processes import reserved_port
from conftest import COLLECTIVE_FLAGS

pytestmark = pytest.mark.watchdog(600)  # 2 processes: a child process group with a deadline (tests/_watchdog.py)

MESH = (1, 4, 2)  # (data, fsdp, tensor) over the 8 devices of both processes


def test_two_processes_write_one_checkpoint_equal_to_single_process(tmp_path):
    from _convert_fixtures import make_upstream_checkpoint

    import llavaction_jax
    from llavaction_jax.convert import from_torch
    from llavaction_jax.tree import flatten_paths
    from llavaction_jax.sharding import make_mesh

    make_upstream_checkpoint(tmp_path / "src", dtype="bfloat16", unused=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + COLLECTIVE_FLAGS, JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    with reserved_port() as port:
        workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outputs = [w.communicate()[0] for w in workers]  # bounded by the watchdog, which kills them too
    for i, (w, out) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"worker {i} failed:\n{out[-3000:]}"

    single = from_torch.import_checkpoint(tmp_path / "src", tmp_path / "single", progress=False)
    total = single.bytes_read
    for i in range(2):  # every process read its own half of the sharded tensors, not the whole checkpoint
        read = json.loads((tmp_path / f"bytes_read.{i}.json").read_text())
        assert 0.4 * total < read < 0.75 * total, (i, read, total)

    # ... and wrote only its own chunks: Orbax keeps one OCDBT data folder per process, merged by reference
    written = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
               for d in (tmp_path / "pod" / "params").glob("ocdbt.process_*")}
    assert len(written) == 2 and all(0.3 < n / sum(written.values()) < 0.7 for n in written.values()), written
    pod = llavaction_jax.load_pretrained(tmp_path / "pod")
    ref = llavaction_jax.load_pretrained(tmp_path / "single")
    assert pod.cfg == ref.cfg and pod.cfg.param_dtype == "bfloat16"
    got, want = flatten_paths(pod.params), flatten_paths(ref.params)
    assert set(got) == set(want)
    for path in want:
        a, b = np.asarray(got[path]), np.asarray(want[path])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    # and it restores straight onto the same mesh shape in one process (8 devices here)
    sharded = llavaction_jax.load_pretrained(tmp_path / "pod", mesh=make_mesh(*MESH))
    kernel = sharded.params["text"]["layers"]["mlp"]["up"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert np.asarray(kernel).tobytes() == np.asarray(want["text/layers/mlp/up/kernel"]).tobytes()


def _worker(process_id: int, port: int, root: pathlib.Path) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from llavaction_jax.convert import from_torch
    from llavaction_jax.sharding import make_mesh

    report = from_torch.import_checkpoint(root / "src", root / "pod", mesh=make_mesh(*MESH), progress=False)
    (root / f"bytes_read.{process_id}.json").write_text(json.dumps(report.bytes_read))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
