"""What the host has, read before JAX starts (no JAX import here).

With libtpu installed (requirements.txt pins it for ahead-of-time TPU compiles) JAX tries the TPU runtime first on
every run: about a second, warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, a log file in /tmp/tpu_logs
and a lock file. On a host without accelerators the CPU is the only backend, so the command line and the
benchmarks ask for it (`prefer_cpu_without_accelerators`) before JAX is imported; an explicit JAX_PLATFORMS wins.
"""

from __future__ import annotations

import os
import pathlib

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (and Google's virtual NICs: such a host counts as one with a TPU)
GPU_DEVICE_NODES = ("dev/nvidiactl", "dev/nvidia0", "dev/kfd")  # NVIDIA driver, AMD ROCm


def accelerator_free_host(root: str = "/") -> bool:
    """True when this host shows no TPU on its PCI bus (Google's vendor id, as JAX's own TPU detection reads it)
    and no GPU device node."""
    base = pathlib.Path(root)
    if any((base / node).exists() for node in GPU_DEVICE_NODES):
        return False
    for vendor in base.glob("sys/bus/pci/devices/*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return False
        except OSError:
            continue
    return True


def prefer_cpu_without_accelerators() -> None:
    """JAX_PLATFORMS=cpu on a host without accelerators, unless JAX_PLATFORMS is set. Call before importing JAX."""
    if "JAX_PLATFORMS" not in os.environ and accelerator_free_host():
        os.environ["JAX_PLATFORMS"] = "cpu"


def reader_threads(requested: int = 0) -> int:
    """Threads that decode and encode input samples beside the step: `requested` when positive, else half of the
    cores this process may run on, 1 to 4. Readers run their decoding outside the GIL, so more runnable readers than
    the cores the step leaves free take cores from the step itself: on 2 cores with the demo's training step on
    one XLA thread, 4 busy readers made the step 45% slower, 2 readers 19%, 1 reader 3%
    (docs/training.md)."""
    if requested > 0:
        return requested
    return max(1, min(4, usable_cores() // 2))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
