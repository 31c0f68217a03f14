"""Multi-host start: call `jax.distributed.initialize()` wherever JAX can find the cluster on its own.

`detect_cluster(environ)` names the multi-process cluster an environment describes, or None for a single process:

  tpu-pod   a TPU pod slice or multislice seen through its environment: several hosts in TPU_WORKER_HOSTNAMES /
            TPU_PROCESS_ADDRESSES (GKE, or exported by a bootstrap script), or MEGASCALE_NUM_SLICES > 1
  slurm     a SLURM step with SLURM_NTASKS > 1 and the variables JAX's SLURM detection reads
  open-mpi  mpirun / mpiexec of Open MPI with OMPI_COMM_WORLD_SIZE > 1

A Cloud TPU VM started with `gcloud compute tpus tpu-vm ssh --worker=all` (launch/tpu_pod.sh) has none of these
variables: its topology is in the GCE metadata server, where JAX itself reads it. `maybe_initialize` therefore
also asks that server how many workers the slice has, but only on a machine with TPU chips attached
(`gce_tpu_workers`), so nothing else waits on a network call.

One process (a laptop, one GPU host, a single-host TPU VM, `srun -n 1`, `mpirun -n 1`) is never initialised:
jax.distributed would only add a coordinator service and a port to collide on.
"""

from __future__ import annotations

import os
import pathlib
import urllib.request
from typing import Mapping

import jax

MODES = ("auto", "on", "off")
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor
# What JAX's SLURM detection needs (jax/_src/clusters/slurm_cluster.py, SlurmCluster.is_env_present).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _count(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster this environment describes ("tpu-pod", "slurm", "open-mpi"), or None."""
    tpu_hosts = max(_hosts(environ.get("TPU_PROCESS_ADDRESSES")), _hosts(environ.get("TPU_WORKER_HOSTNAMES")))
    if tpu_hosts > 1 or _count(environ.get("MEGASCALE_NUM_SLICES")) > 1:
        return "tpu-pod"
    if all(k in environ for k in SLURM_VARS) and _count(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if _count(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "open-mpi"
    return None


def has_tpu_chips(sys_root: str | os.PathLike = "/sys") -> bool:
    """True when a Google PCI device (a TPU chip) is attached, as JAX's own Cloud TPU check reads it."""
    devices = pathlib.Path(sys_root) / "bus" / "pci" / "devices"
    try:
        return any((d / "vendor").read_text().strip() == GOOGLE_PCI_VENDOR for d in devices.iterdir())
    except OSError:
        return False


def gce_tpu_workers(timeout_s: float = 5.0) -> int:
    """Workers of this Cloud TPU VM's slice from the GCE metadata server (0 when it does not answer)."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
        headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return _hosts(response.read().decode())
    except OSError:
        return 0


def initialize_args(cluster: str | None, environ: Mapping[str, str]) -> dict:
    """Arguments for `jax.distributed.initialize`. Open MPI 5 (PRRTE) no longer sets the OMPI_MCA_orte_hnp_uri
    JAX's detection reads: there the process count and id come from OMPI_COMM_WORLD_* and the coordinator from
    JAX_COORDINATOR_ADDRESS (which jax.distributed reads itself)."""
    if cluster == "open-mpi" and "OMPI_MCA_orte_hnp_uri" not in environ:
        if "JAX_COORDINATOR_ADDRESS" not in environ:
            raise RuntimeError("Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5): set JAX_COORDINATOR_ADDRESS="
                               "HOST:PORT (rank 0's host) so the processes can find each other")
        return dict(num_processes=int(environ["OMPI_COMM_WORLD_SIZE"]),
                    process_id=int(environ.get("OMPI_COMM_WORLD_RANK", "0")))
    return {}


def maybe_initialize(mode: str = "auto", environ: Mapping[str, str] | None = None) -> str | None:
    """Initialise jax.distributed as `mode` says ("on" always, "off" never, "auto" on a detected cluster).
    Returns what was initialised (the cluster name, or "on"), None when nothing was. Call before any JAX
    computation (the backend must not be up yet)."""

    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}: expected one of {MODES}")
    if mode == "off" or jax.distributed.is_initialized():
        return None
    environ = os.environ if environ is None else environ
    cluster = detect_cluster(environ)
    if cluster is None and mode == "auto" and has_tpu_chips() and gce_tpu_workers() > 1:
        cluster = "tpu-pod"
    if cluster is None and mode == "auto":
        return None
    jax.distributed.initialize(**initialize_args(cluster, environ))
    return cluster or mode
