"""The model as a Flax NNX module over the same functions and the same parameter tree (docs/flax-nnx.md).

The pure functions of `model/` stay the implementation. `LlavaNNX` holds their parameter tree, leaf for leaf, as
`nnx.Param`s, each carrying its logical axes from the parameter specs (model/params.py) as `out_sharding`
metadata, and its methods hand that tree to the functions: `__call__` is `llava.forward`, `lm_logits` is
`llava.lm_logits`, `compute_losses` is `losses.compute_losses`. Nothing is computed twice in two ways.

    model = LlavaNNX(cfg, params)        # params: llava.init(cfg, key), load_pretrained(path).params, Orbax, ...
    out = model(input_ids, pixel_values, attention_mask, labels)        # = llava.forward(params, cfg, resolved, ...)
    to_params(model)                     # the plain dict again (the converter's and Orbax's tree), same arrays
    graphdef, state = nnx.split(model)   # state: that tree of Params; nnx.to_pure_dict(state) == to_params(model)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)

Sharding: `LlavaNNX(cfg, params, mesh)` places the params as `sharding.param_shardings` does. For Flax's own tools,
`with nnx.logical_axis_rules(LOGICAL_AXIS_RULES): nnx.get_partition_spec(state)` maps the logical axes through the
project's one table (`sharding.LOGICAL_RULES`); `param_shardings(model, mesh)` reads the same metadata through
`sharding.param_shardings`, which also replicates a dimension the mesh does not divide (Flax's rules do not).

Flax is imported here only: the rest of the package runs without it.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from llavaction_jax import losses, sharding
from llavaction_jax.config import ExecutionConfig, ModelConfig, ResolvedExecution
from llavaction_jax.model import llava
from llavaction_jax.model.params import ParamSpec, check_shapes, is_spec

# the logical -> mesh axis table in the form of Flax's logical_axis_rules
LOGICAL_AXIS_RULES = tuple(sharding.LOGICAL_RULES.items())


class LlavaNNX(nnx.Module):
    """`llava`'s parameter tree as `nnx.Param`s (the top-level keys "vision", "projector", "text", ... are the
    module's attributes) and its config.

    `cfg` is the model's config (the architecture); `resolved` is `execution` (default: `ExecutionConfig()`)
    resolved for the mesh's devices (`sharding.resolve_execution`), which every method passes to the functions
    with `cfg`. With `mesh`, the
    params are placed by their logical axes (`sharding.param_shardings`); without, they stay where they are.
    Eager sharding is off for these Params: their metadata names logical axes, which need the rules above.
    """

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh | None = None,
                 execution: ExecutionConfig | None = None):
        specs = llava.param_specs(cfg)
        check_shapes(specs, params)
        if mesh is not None:
            params = jax.tree.map(jax.device_put, params, sharding.param_shardings(specs, mesh))
        self.cfg = cfg
        self.resolved = sharding.resolve_execution(execution or ExecutionConfig(), mesh)
        for name, subtree in params.items():
            if hasattr(type(self), name):  # a future top-level key must not shadow a method
                raise ValueError(f"params key {name!r} is an attribute of {type(self).__name__}")
            setattr(self, name, nnx.data(jax.tree.map(_as_param, specs[name], subtree, is_leaf=is_spec)))

    def _functional(self) -> tuple[dict, ModelConfig, ResolvedExecution]:
        """What every method hands to the functions: the plain parameter tree, the config and the resolved
        execution choices."""
        return to_params(self), self.cfg, self.resolved

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None, attention_mask: jax.Array | None = None,
                 labels: jax.Array | None = None, has_video: jax.Array | None = None, out_len: int | None = None,
                 num_frames: jax.Array | None = None) -> llava.ModelOutput:
        """`llava.forward` with this module's params and config (its docstring has the arguments)."""
        params, cfg, resolved = self._functional()
        return llava.forward(params, cfg, resolved, input_ids, pixel_values, attention_mask, labels, has_video, out_len,
                             num_frames)

    def lm_logits(self, hidden: jax.Array, vocab_limit: int | None = None) -> jax.Array:
        """`llava.lm_logits`: fp32 next-token logits of hidden states."""
        params, _, _ = self._functional()
        return llava.lm_logits(params, hidden, vocab_limit)

    def compute_losses(self, out: llava.ModelOutput, actions: jax.Array | None = None, **kwargs) -> losses.Losses:
        """`losses.compute_losses` of a forward pass (`reduction`, `logits`, `num_samples` as there)."""
        params, cfg, resolved = self._functional()
        return losses.compute_losses(params, cfg, resolved, out, actions, **kwargs)


def _as_param(spec: ParamSpec, value) -> nnx.Param:
    return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)


def to_params(model: LlavaNNX) -> dict:
    """The module's plain parameter tree (`llava.param_specs`' nesting, the very arrays it holds): what the
    converter writes, Orbax saves (`checkpoint_io.save_model`) and the functions take. `LlavaNNX(cfg, params)` is
    the way back."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_shardings(model: LlavaNNX, mesh: Mesh) -> dict:
    """NamedShardings on `mesh` for the module's params, from each Param's logical axes (its metadata) through
    `sharding.param_shardings`; nested as `to_params`."""
    specs = nnx.to_pure_dict(nnx.state(model, nnx.Param),
                             lambda p: ParamSpec(tuple(p.get_value().shape), tuple(p.out_sharding)))
    return sharding.param_shardings(specs, mesh)
