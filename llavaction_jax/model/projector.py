"""Multimodal projector: `linear` or `mlp<N>x_gelu` (Linear, then N-1 x [exact-erf GELU, Linear])."""

from __future__ import annotations

import jax

from llavaction_jax.model.layers import gelu_exact, linear
from llavaction_jax.model.params import dense


def param_specs(depth: int, d_in: int, d_out: int) -> dict:
    specs = {"fc1": dense(d_in, d_out, "embed", "mlp")}
    for i in range(2, depth + 1):
        specs[f"fc{i}"] = dense(d_out, d_out, "mlp", "embed")
    return specs


def project(params: dict, x: jax.Array) -> jax.Array:
    x = linear(params["fc1"], x)
    for i in range(2, len(params) + 1):
        x = linear(params[f"fc{i}"], gelu_exact(x))
    return x
