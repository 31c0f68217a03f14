"""Accelerator slices described without the hardware, for ahead-of-time compilation (bench/aot.py).

A topology string names a chip generation and a slice: `v5e:2x2`, `v5p:2x2x2`, `v6e:4x4` (TPU: libtpu's own
topology names) or `h100:8`, `h200:16` (NVIDIA GPUs: that many GPUs, 8 per host). `target_devices` returns JAX
device descriptions of that slice from `jax.experimental.topologies`: libtpu describes TPU slices; the CUDA plugin
(jax[cuda12]) describes GPUs from a `GpuTargetConfigProto` kept in gpu_targets/ (written from the published
limits of each GPU). Nothing runs on them: programs lowered with arguments sharded over a mesh of these devices
compile into real TPU / GPU executables whose memory analysis is the chip's.

`prepare_environment()` must run before JAX starts its backends: the host's own backend is the CPU (these
programs never run), libtpu writes no logs and takes no lock (several compiles may run at once), and libtpu's
warnings about the TPU VM it is not on are silenced by naming this host as a one-chip single host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib

GIB = 2**30
GPU_TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation: its memory, its dense bf16 peak, and the slices a search may try."""

    name: str
    platform: str  # "tpu" or "gpu"
    hbm_bytes: int
    peak_bf16_flops: float
    slices: tuple[str, ...]  # topology names in increasing chip count (`--search` walks them)
    target_config: str | None = None  # GPUs: file in gpu_targets/


# Memory per chip and dense bf16 peak: Google Cloud's TPU pages (v5e 16 GiB / 197 TFLOP/s, v5p 95 GiB / 459,
# v6e 32 GiB / 918) and NVIDIA's H100 SXM / H200 SXM datasheets (80 GB / 141 GB, 989 TFLOP/s dense). GPU memory
# is the decimal datasheet figure, a little below what CUDA reports, so a fit is conservative.
_TPU_2D = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
CHIPS: dict[str, Chip] = {
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197e12, tuple(f"v5e:{s}" for s in _TPU_2D)),
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918e12, tuple(f"v6e:{s}" for s in _TPU_2D)),
    "v5p": Chip("TPU v5p", "tpu", 95 * GIB, 459e12,
                tuple(f"v5p:{s}" for s in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"))),
    "h100": Chip("NVIDIA H100 SXM", "gpu", 80 * 10**9, 989e12, tuple(f"h100:{n}" for n in (1, 2, 4, 8, 16, 32, 64)),
                 "h100_sxm.txtpb"),
    "h200": Chip("NVIDIA H200 SXM", "gpu", 141 * 10**9, 989e12, tuple(f"h200:{n}" for n in (1, 2, 4, 8, 16, 32, 64)),
                 "h200_sxm.txtpb"),
}


class TargetError(ValueError):
    """A topology that cannot be described here (unknown name, missing plugin)."""


def parse_topology(topology: str) -> tuple[Chip, str]:
    """"v5p:2x2x2" -> (the v5p Chip, "v5p:2x2x2"); raises TargetError naming the accepted forms."""
    generation, _, shape = topology.partition(":")
    chip = CHIPS.get(generation.lower())
    dims = shape.split("x")
    if chip is None or not shape or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise TargetError(f"topology {topology!r}: expected GENERATION:SHAPE with GENERATION one of {sorted(CHIPS)} "
                          "(TPU: v5e:2x2, v5p:2x2x2, v6e:4x4; GPU: h100:8, h200:16 = that many GPUs)")
    if chip.platform == "gpu" and (len(dims) != 1 or (int(dims[0]) > GPUS_PER_HOST and int(dims[0]) % GPUS_PER_HOST)):
        raise TargetError(f"topology {topology!r}: a GPU slice is h100:N / h200:N GPUs, N <= {GPUS_PER_HOST} or a "
                          f"multiple of {GPUS_PER_HOST} (hosts of {GPUS_PER_HOST})")
    return chip, f"{generation.lower()}:{shape}"


def chip_count(topology: str) -> int:
    return math.prod(int(d) for d in topology.partition(":")[2].split("x"))


def prepare_environment() -> None:
    """Environment for describing accelerators on a host that has none (see the module docstring). Must run before
    JAX initialises its backends; settings the user made are kept."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend: the programs target the described chips
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA driver to check against
    os.environ.setdefault("TPU_LOG_DIR", "disabled")  # no /tmp/tpu_logs file per process
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no /tmp/libtpu_lockfile: compiles may run side by side
    for name, value in (("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_HOST_BOUNDS", "1,1,1"),
                        ("TPU_CHIPS_PER_HOST_BOUNDS", "1,1,1")):  # this host, not a TPU VM: nothing to look up
        os.environ.setdefault(name, value)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def target_problem(chip: Chip) -> str | None:
    """Why this chip's slices cannot be described in this environment, or None."""
    if chip.platform == "tpu" and not _installed("libtpu"):
        return ("TPU topologies need libtpu: pip install -r requirements.txt (it pins the libtpu of jax[tpu] for "
                "this jax; wheels for x86-64 Linux only)")
    if chip.platform == "gpu" and not (_installed("jax_cuda12_plugin") or _installed("jax_plugins.xla_cuda12")):
        return ("GPU topologies need the CUDA plugin (several GB, not in the test requirements): "
                "pip install \".[cuda12]\" (or \"jax[cuda12]==<the jax version>\") in a separate venv, docs/aot.md")
    return None


def target_devices(topology: str) -> tuple[Chip, list]:
    """The chip and the device descriptions of a slice (TPU via libtpu, GPU via the CUDA plugin)."""
    from jax.experimental import topologies

    chip, name = parse_topology(topology)
    problem = target_problem(chip)
    if problem:
        raise TargetError(problem)
    if chip.platform == "tpu":
        return chip, list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    count = chip_count(name)
    hosts, per_host = (1, count) if count <= GPUS_PER_HOST else (count // GPUS_PER_HOST, GPUS_PER_HOST)
    config = (GPU_TARGETS_DIR / chip.target_config).read_text()
    desc = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x{hosts}x{per_host}")
    return chip, list(desc.devices)
