"""`python -m llavaction_jax.probe [EXPECTED]`: print JAX's backend and local devices; what every launcher runs
before training, so a job that would silently train on the CPU (a missing jax[cuda12] / jax[tpu], a driver that
does not load) shows it in its first line, and stops when an accelerator was asked for (EXPECTED, the launchers'
JAX_EXTRA, e.g. cuda12 or tpu) but JAX sees only the CPU. Exit status 1 then, else 0.
"""

from __future__ import annotations

import sys

import jax


def describe() -> str:
    devices = jax.local_devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"[launch] JAX {jax.__version__}: backend {jax.default_backend()}, {len(devices)} local device(s) "
            f"({', '.join(kinds)}), process {jax.process_index()}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    expected = argv[0] if argv else ""
    print(describe(), flush=True)
    if expected and jax.default_backend() == "cpu":
        print(f"[launch] error: JAX_EXTRA={expected} asks for an accelerator but JAX sees only the CPU; check the "
              f"driver / runtime and that jax[{expected}] is installed in this environment", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
