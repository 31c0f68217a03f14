"""The Flax NNX module (llavaction_jax/nnx_model.py) against the functions it wraps: the same forward, the same
gradients, `nnx.split` / `nnx.merge` to the plain parameter tree and back, sharding from the Params' metadata equal
to `sharding.param_shardings`, and the fine-tuning example of docs/flax-nnx.md run as written, its `nnx.Optimizer`
steps equal to optax steps on the functions.

The references are the functions the rest of the package runs (`llava.forward`, `losses.compute_losses`, as the
train step calls them; they are checked against torch in test_losses.py and test_parity_hf.py)."""

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
from llavaction_jax import losses, nnx_model, sharding
from llavaction_jax.config import ExecutionConfig, load_preset
from llavaction_jax.model import llava
from llavaction_jax.model.params import is_spec, logical_axes
from llavaction_jax.tree import flatten_paths

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = load_preset("tiny")
RESOLVED = sharding.resolve_execution(ExecutionConfig())  # what the module resolves for itself without a mesh


@pytest.fixture(scope="module")
def params():
    return llava.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    size = CFG.vision.image_size
    ids = rng.integers(0, CFG.text.vocab_size, (2, 16))
    ids[:, 3] = llava.IMAGE_TOKEN_INDEX
    mask = np.ones((2, 16), bool)
    mask[1, -2:] = False
    labels = np.where((np.arange(16) >= 9) & mask, ids, llava.IGNORE_INDEX)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels),
            "pixel_values": jnp.asarray(rng.uniform(-1, 1, (2, 2, 3, size, size)), jnp.float32),
            "actions": jnp.asarray([[1, 2, 3], [-1, -1, -1]])}


# The train step's loss (train/step.py: loss_fn) written with the functions and with the module, returning the
# forward's output and logits too, so that one compilation of each checks the forward and the gradients.
def functional_loss(params, b):
    out = llava.forward(params, CFG, RESOLVED, b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    loss = losses.compute_losses(params, CFG, RESOLVED, out, b["actions"], reduction="sample").loss
    return loss, (out, llava.lm_logits(params, out.hidden))


def module_loss(model, b):
    out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    loss = model.compute_losses(out, b["actions"], reduction="sample").loss
    return loss, (out, model.lm_logits(out.hidden))


value_and_grad_fn = jax.jit(jax.value_and_grad(functional_loss, has_aux=True))
value_and_grad_nnx = nnx.jit(nnx.value_and_grad(module_loss, has_aux=True))


@pytest.fixture(scope="module")
def results(params, batch):
    """((loss, (output, logits)), grads) of the module and of the functions."""
    return value_and_grad_nnx(nnx_model.LlavaNNX(CFG, params), batch), value_and_grad_fn(params, batch)


def assert_trees_equal(got: dict, want: dict, **tol):
    got, want = flatten_paths(got), flatten_paths(want)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        if tol:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), err_msg=path, **tol)
        else:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


def test_call_is_llava_forward(results):
    ((got_loss, got), _), ((want_loss, want), _) = results
    assert got[0].action_states is not None and got[1].shape == (2, 16 - 1 + CFG.tokens_per_video(2), 512)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(got_loss) == float(want_loss) and float(got_loss) > 0


def test_gradients_are_the_functions_gradients(results):
    (_, grads), (_, want) = results
    got = nnx.to_pure_dict(grads)
    assert_trees_equal(got, want, rtol=1e-6, atol=1e-9)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(got))  # no parameter is cut off from the loss


def test_split_merge_round_trip_the_plain_tree(params, batch):
    model = nnx_model.LlavaNNX(CFG, params)
    assert model.resolved == RESOLVED
    assert_trees_equal(nnx_model.to_params(model), params)
    graphdef, state = nnx.split(model)
    assert_trees_equal(nnx.to_pure_dict(state), params)
    axes = flatten_paths(logical_axes(llava.param_specs(CFG)))
    metadata = flatten_paths(nnx.to_pure_dict(state, lambda p: tuple(p.out_sharding)))
    assert metadata == axes and ("embed", "mlp") in metadata.values()

    # another plain tree (as Orbax or the converter gives one) into the same graph
    other = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) * 0.5 + 0.25), params)  # numpy: no eager JAX op programs
    nnx.replace_by_pure_dict(state, other)
    merged = nnx.merge(graphdef, state)
    assert (merged.cfg, merged.resolved) == (CFG, RESOLVED)
    assert_trees_equal(nnx_model.to_params(merged), other)
    assert_trees_equal(nnx_model.to_params(model), params)  # the original module is untouched
    (_, (got, _)), _ = value_and_grad_nnx(merged, batch)
    (_, (want, _)), _ = value_and_grad_fn(other, batch)
    np.testing.assert_array_equal(np.asarray(got.hidden), np.asarray(want.hidden))


def test_wrong_params_name_the_parameter(params):
    missing = {k: v for k, v in params.items() if k != "image_newline"}
    with pytest.raises(KeyError, match="missing \\['image_newline'\\]"):
        nnx_model.LlavaNNX(CFG, missing)
    wrong = {**params, "image_newline": jnp.zeros(3)}
    with pytest.raises(ValueError, match="image_newline has shape \\(3,\\), config expects \\(128,\\)"):
        nnx_model.LlavaNNX(CFG, wrong)


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
    assert on_mesh.resolved == sharding.resolve_execution(ExecutionConfig(), mesh) and on_mesh.resolved.loop_collectives == "off"
    assert_trees_equal(nnx_model.to_params(on_mesh), params)


def test_param_shardings_replicates_what_the_mesh_does_not_divide():
    cfg = CFG.replace(text=dataclasses.replace(CFG.text, intermediate_size=100))  # 100 over tensor=8
    specs = llava.param_specs(cfg)
    model = nnx_model.LlavaNNX(cfg, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), specs, is_leaf=is_spec))
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)
    got = flatten_paths(nnx_model.param_shardings(model, mesh))
    assert got == flatten_paths(sharding.param_shardings(specs, mesh))
    assert got["text/layers/mlp/up/kernel"].spec[2] is None  # (layers, embed, mlp): replicated
    assert got["text/layers/attn/q/kernel"].spec[2] == "tensor"


def test_the_docs_fine_tuning_example_runs_as_written(params, tmp_path, monkeypatch):
    """The example's `nnx.Optimizer` steps are the same steps as optax's on the functions, and what it saves
    loads back (Orbax on disk) as the module it trained."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "flax-nnx.md").read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(blocks[0], "docs/flax-nnx.md", "exec"), ns)
    history, model, optimizer = ns["history"], ns["model"], ns["optimizer"]
    assert len(history) == 5 and history[-1] < history[0] - 0.1  # it learns
    assert int(optimizer.step[...]) == 5

    # the same five steps with the functions and optax, jitted whole like the example's step: Adam scales each
    # gradient entry to about +-lr, so entries whose gradient is rounding noise (SigLIP's key bias, which softmax
    # ignores; nearly so Qwen2's on RoPE's slowest dimensions) move apart between two differently compiled programs
    tx = optimizer.tx

    @jax.jit
    def optax_step(p, opt_state, input_ids, pixel_values, labels, actions):
        def loss_fn(p):
            out = llava.forward(p, CFG, RESOLVED, input_ids, pixel_values, labels=labels)
            return losses.compute_losses(p, CFG, RESOLVED, out, actions, reduction="sample").loss

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    example = [jnp.asarray(ns[k]) for k in ("input_ids", "pixel_values", "labels", "actions")]
    p, opt_state, want = params, tx.init(params), []  # the example starts from llava.init(cfg, key(0)) too
    for _ in range(5):
        p, opt_state, loss = optax_step(p, opt_state, *example)
        want.append(float(loss))
    np.testing.assert_allclose(history, want, rtol=1e-6)
    trained = nnx_model.to_params(model)
    assert_trees_equal(trained, p, rtol=1e-6, atol=1e-7)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(trained), jax.tree.leaves(params))]
    assert min(moved) > 1e-4  # every parameter was updated

    saved = llavaction_jax.load_pretrained(tmp_path / "finetuned-tiny")
    assert saved.cfg == CFG
    assert_trees_equal(nnx_model.to_params(nnx_model.LlavaNNX(saved.cfg, saved.params)), trained)
