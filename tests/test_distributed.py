"""Cluster detection for jax.distributed (llavaction_jax/distributed.py): each cluster kind from its environment,
single-process environments that must not initialise, and `maybe_initialize` in a real process."""

import os
import subprocess
import sys

import pytest

from _processes import reserved_port
from llavaction_jax.distributed import detect_cluster, has_tpu_chips, initialize_args

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
MULTI = {
    "tpu-pod": [
        {"TPU_WORKER_HOSTNAMES": "t1v-n-0-w-0,t1v-n-0-w-1,t1v-n-0-w-2,t1v-n-0-w-3", "TPU_WORKER_ID": "2"},  # GKE
        {"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476", "TPU_WORKER_ID": "0"},
        {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1", "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"},
    ],
    "slurm": [dict(SLURM, SLURM_NTASKS="8")],
    "open-mpi": [
        {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"},  # Open MPI 4
        {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"},  # Open MPI 5 (PRRTE)
    ],
}
SINGLE = [
    {},  # a laptop / one GPU host
    {"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"},  # a single-host TPU slice on GKE
    {"MEGASCALE_NUM_SLICES": "1", "TPU_WORKER_HOSTNAMES": "w-0"},
    dict(SLURM, SLURM_NTASKS="1"),  # srun -n 1 / a one-task allocation
    {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"},  # inside sbatch but outside srun: no step, nothing to join
    {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},  # mpirun -n 1
    {"OMPI_COMM_WORLD_SIZE": "four"},
]


@pytest.mark.parametrize("kind,env", [(k, e) for k, envs in MULTI.items() for e in envs])
def test_detects_multi_process_clusters(kind, env):
    assert detect_cluster(env) == kind


@pytest.mark.parametrize("env", SINGLE)
def test_single_process_environments_are_not_clusters(env):
    assert detect_cluster(env) is None


def test_open_mpi_5_needs_a_coordinator_and_passes_its_rank():
    env = MULTI["open-mpi"][1]
    with pytest.raises(RuntimeError, match="JAX_COORDINATOR_ADDRESS"):
        initialize_args("open-mpi", env)
    assert initialize_args("open-mpi", dict(env, JAX_COORDINATOR_ADDRESS="n0:1234")) == dict(num_processes=2,
                                                                                            process_id=0)
    assert initialize_args("open-mpi", MULTI["open-mpi"][0]) == {}  # JAX reads Open MPI 4 itself
    assert initialize_args("slurm", MULTI["slurm"][0]) == {}


def test_tpu_chips_from_a_sysfs_tree(tmp_path):
    devices = tmp_path / "bus" / "pci" / "devices"
    for name, vendor in (("0000:00:04.0", "0x1af4"), ("0000:00:05.0", "0x8086")):
        (devices / name).mkdir(parents=True)
        (devices / name / "vendor").write_text(vendor + "\n")
    assert not has_tpu_chips(tmp_path)
    (devices / "0000:00:06.0").mkdir()
    (devices / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")
    assert has_tpu_chips(tmp_path)
    assert not has_tpu_chips(tmp_path / "missing")


PROBE = """
import jax, sys
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from llavaction_jax.distributed import maybe_initialize
print("RESULT", maybe_initialize(sys.argv[1]), jax.distributed.is_initialized(), jax.process_count(), flush=True)
"""


def probe(mode, envs, timeout=180):
    """Start one process per environment at once (they may have to find each other); their RESULT fields.
    `timeout=None` where the test's watchdog bounds them (several processes that could wait on each other)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
    clean.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, mode], env=dict(clean, **env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]
        results.append([line for line in out.splitlines() if line.startswith("RESULT")][0].split()[1:])
    return results


def test_single_process_jobs_stay_single_in_a_real_process():
    assert probe("auto", [dict(SLURM, SLURM_NTASKS="1")]) == [["None", "False", "1"]]
    assert probe("auto", [{"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}]) == [["None", "False", "1"]]
    assert probe("off", [dict(MULTI["slurm"][0])]) == [["None", "False", "1"]]  # "off" wins over a cluster


@pytest.mark.watchdog(300)  # 2 processes that wait for each other: a child process group with a deadline
def test_two_mpirun_processes_find_each_other_without_a_flag():
    """The environment `mpirun -n 2` gives its ranks (Open MPI 5 style, plus the coordinator address): "auto"
    detects the job and both processes join one 2-process jax.distributed system."""
    with reserved_port() as port:
        envs = [{"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
                 "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"} for i in range(2)]
        assert probe("auto", envs, timeout=None) == [["open-mpi", "True", "2"]] * 2


def test_unknown_mode_is_an_error():
    from llavaction_jax.distributed import maybe_initialize

    with pytest.raises(ValueError, match="distributed mode"):
        maybe_initialize("yes")
