"""The Flax NNX module (llavaction_jax/nnx_model.py) against the functions it wraps: the same forward, the same
gradients, `nnx.split` / `nnx.merge` to the plain parameter tree and back, `nnx.Optimizer` steps equal to optax
steps on the functions, sharding from the Params' metadata equal to `sharding.param_shardings`, and the fine-tuning
example of docs/flax-nnx.md run as written.

The references are the functions the rest of the package runs: `llava.forward` and the train step's
`train.step.loss_fn` (itself checked against torch in test_losses.py / test_parity_hf.py)."""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llavaction_jax
from llavaction_jax import nnx_model, sharding
from llavaction_jax.config import load_preset
from llavaction_jax.model import llava
from llavaction_jax.model.params import flatten_paths, logical_axes
from llavaction_jax.train.step import loss_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = load_preset("tiny")
RUN_CFG = sharding.resolve_config(CFG)  # what the module resolves for itself without a mesh


@pytest.fixture(scope="module")
def params():
    return llava.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    size = CFG.vision.image_size
    ids = rng.integers(0, CFG.text.vocab_size, (2, 12))
    ids[:, 3] = llava.IMAGE_TOKEN_INDEX
    mask = np.ones((2, 12), bool)
    mask[1, -2:] = False  # a padded row
    labels = np.where((np.arange(12) >= 7) & mask, ids, llava.IGNORE_INDEX)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels),
            "pixel_values": jnp.asarray(rng.uniform(-1, 1, (2, 2, 3, size, size)), jnp.float32),
            "actions": jnp.asarray([[1, 2, 3], [4, 5, 6]])}


# compiled once each and shared by the tests (same shapes, same graphdef)
@jax.jit
def forward_fn(params, b):
    out = llava.forward(params, RUN_CFG, b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    return out, llava.lm_logits(params, out.hidden)


@nnx.jit
def forward_nnx(model, b):
    out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    return out, model.lm_logits(out.hidden)


def module_loss(model, b):
    out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    return model.compute_losses(out, b["actions"], reduction="sample").loss


value_and_grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, RUN_CFG, b, "sample")[0]))
value_and_grad_nnx = nnx.jit(nnx.value_and_grad(module_loss))


def assert_trees_equal(got: dict, want: dict, **tol):
    got, want = flatten_paths(got), flatten_paths(want)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        if tol:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), err_msg=path, **tol)
        else:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


def test_call_is_llava_forward(params, batch):
    model = nnx_model.LlavaNNX(CFG, params)
    assert model.run_cfg == RUN_CFG
    (got, got_logits), (want, want_logits) = forward_nnx(model, batch), forward_fn(params, batch)
    assert got.action_states is not None
    for a, b in zip(jax.tree.leaves((got, got_logits)), jax.tree.leaves((want, want_logits)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradients_are_the_functions_gradients(params, batch):
    model = nnx_model.LlavaNNX(CFG, params)
    loss, grads = value_and_grad_nnx(model, batch)
    want_loss, want_grads = value_and_grad_fn(params, batch)
    assert float(loss) == float(want_loss) and float(loss) > 0
    got = nnx.to_pure_dict(grads)
    assert_trees_equal(got, want_grads, rtol=1e-6, atol=1e-9)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(got))  # every parameter takes part


def test_split_merge_round_trip_the_plain_tree(params, batch):
    model = nnx_model.LlavaNNX(CFG, params)
    assert_trees_equal(nnx_model.to_params(model), params)
    graphdef, state = nnx.split(model)
    assert_trees_equal(nnx.to_pure_dict(state), params)
    axes = flatten_paths(logical_axes(llava.param_specs(CFG)))
    metadata = flatten_paths(nnx.to_pure_dict(state, lambda p: tuple(p.out_sharding)))
    assert metadata == axes and ("embed", "mlp") in metadata.values()

    # another plain tree (as Orbax or the converter gives one) into the same graph
    other = jax.tree.map(lambda x: x * 0.5 + 0.25, params)
    nnx.replace_by_pure_dict(state, other)
    merged = nnx.merge(graphdef, state)
    assert (merged.cfg, merged.run_cfg) == (CFG, RUN_CFG)
    assert_trees_equal(nnx_model.to_params(merged), other)
    assert_trees_equal(nnx_model.to_params(model), params)  # the original module is untouched
    got, want = forward_nnx(merged, batch)[0], forward_fn(other, batch)[0]
    np.testing.assert_array_equal(np.asarray(got.hidden), np.asarray(want.hidden))


def test_wrong_params_name_the_parameter(params):
    missing = {k: v for k, v in params.items() if k != "image_newline"}
    with pytest.raises(KeyError, match="missing \\['image_newline'\\]"):
        nnx_model.LlavaNNX(CFG, missing)
    wrong = {**params, "image_newline": jnp.zeros(3)}
    with pytest.raises(ValueError, match="image_newline has shape \\(3,\\), config expects \\(128,\\)"):
        nnx_model.LlavaNNX(CFG, wrong)


def test_optimizer_steps_equal_optax_steps_on_the_functions(params, batch):
    tx = optax.adamw(1e-3, weight_decay=0.01)
    model = nnx_model.LlavaNNX(CFG, params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, b):
        loss, grads = nnx.value_and_grad(module_loss)(model, b)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def optax_step(p, opt_state, b):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, RUN_CFG, b, "sample")[0])(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    p, opt_state = params, tx.init(params)
    got_losses, want_losses = [], []
    for _ in range(4):
        got_losses.append(float(nnx_step(model, optimizer, batch)))
        p, opt_state, loss = optax_step(p, opt_state, batch)
        want_losses.append(float(loss))
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    assert want_losses[-1] < want_losses[0] - 0.1  # it learns
    assert int(optimizer.step[...]) == 4
    assert_trees_equal(nnx_model.to_params(model), p, rtol=1e-6, atol=1e-7)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(nnx_model.to_params(model)), jax.tree.leaves(params))]
    assert min(moved) > 1e-4  # every parameter was updated


def test_params_shard_by_their_metadata_as_param_shardings(params):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    want = flatten_paths(sharding.param_shardings(llava.param_specs(CFG), mesh))
    assert len({s.spec for s in want.values()}) > 3  # fsdp, tensor and replicated dimensions all occur
    model = nnx_model.LlavaNNX(CFG, params)
    state = nnx.state(model, nnx.Param)
    with nnx.logical_axis_rules(nnx_model.LOGICAL_AXIS_RULES):  # Flax's own route
        pspecs = flatten_paths(nnx.to_pure_dict(nnx.get_partition_spec(state)))
        named = nnx.get_named_sharding(state, mesh)
    assert pspecs == {path: s.spec for path, s in want.items()}
    placed = nnx.to_pure_dict(jax.device_put(state, named))
    assert {p: x.sharding for p, x in flatten_paths(placed).items()} == want
    assert flatten_paths(nnx_model.param_shardings(model, mesh)) == want
    # built on the mesh: placed the same way, execution fields resolved for 8 CPU devices
    on_mesh = nnx_model.LlavaNNX(CFG, params, mesh)
    assert {p: x.sharding for p, x in flatten_paths(nnx_model.to_params(on_mesh)).items()} == want
    assert on_mesh.run_cfg == sharding.resolve_config(CFG, mesh) and on_mesh.run_cfg.loop_collectives == "off"
    assert_trees_equal(nnx_model.to_params(on_mesh), params)


def test_param_shardings_replicates_what_the_mesh_does_not_divide():
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, intermediate_size=100))  # 100 rows over tensor=8
    model = nnx_model.LlavaNNX(cfg, llava.init(cfg, jax.random.key(1)))
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)
    got = flatten_paths(nnx_model.param_shardings(model, mesh))
    assert got == flatten_paths(sharding.param_shardings(llava.param_specs(cfg), mesh))
    assert got["text/layers/mlp/up/kernel"].spec[2] is None  # (layers, embed, mlp): replicated
    assert got["text/layers/attn/q/kernel"].spec[2] == "tensor"


def test_the_docs_fine_tuning_example_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "flax-nnx.md").read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "docs/flax-nnx.md", "exec"), namespace)
    history, model = namespace["history"], namespace["model"]
    assert len(history) == 5 and history[-1] < history[0] - 0.1
    saved = llavaction_jax.load_pretrained(tmp_path / "finetuned-tiny")  # Orbax on disk -> the module again
    assert saved.cfg == CFG
    assert_trees_equal(nnx_model.to_params(nnx_model.LlavaNNX(saved.cfg, saved.params)),
                       nnx_model.to_params(model))
