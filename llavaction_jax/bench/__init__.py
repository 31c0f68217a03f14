"""Benchmarks: `python -m llavaction_jax.bench.<name>`; results in BENCHMARKS.md."""

from llavaction_jax import host

host.prefer_cpu_without_accelerators()  # before any benchmark imports JAX (llavaction_jax/host.py says why)
