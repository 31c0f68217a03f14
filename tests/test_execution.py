"""Execution choices are their own config, resolved once at the entry point and refused unresolved by traced code;
the mesh is JAX's context mesh; batches and parameters are placed by one helper each; every model and execution
field is settable from the command line."""

import dataclasses
import logging
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llavaction_jax.config import (AUTO_CPU_FRAMES_PER_STEP, EXECUTION_FIELDS, ConfigError, ExecutionConfig,
                                   ModelConfig, ResolvedExecution, UnresolvedExecution, load_preset, preset_configs)
from llavaction_jax.model import llava
from llavaction_jax.sharding import (batch_sharding, constrain, make_mesh, param_shardings, resolve_execution,
                                     shard_batch, use_mesh)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_resolution_depends_on_platform_and_mesh_size_only():
    cfg = ExecutionConfig()
    cpu1, cpu8, gpu8, tpu4 = (cfg.resolve(p, n) for p, n in (("cpu", 1), ("cpu", 8), ("gpu", 8), ("tpu", 4)))
    assert (cpu1.platform, cpu1.loop_collectives, cpu1.vision_frames_per_step) == ("cpu", "on", AUTO_CPU_FRAMES_PER_STEP)
    # several CPU devices: no sharded work inside loops or conditionals, every frame at once
    assert (cpu8.loop_collectives, cpu8.vision_frames_per_step) == ("off", -1)
    assert (gpu8.platform, gpu8.loop_collectives, gpu8.vision_frames_per_step) == ("gpu", "on", -1)
    assert (tpu4.platform, tpu4.loop_collectives) == ("tpu", "on")
    # explicit choices are kept; resolving twice changes nothing
    explicit = cfg.replace(loop_collectives="on", vision_frames_per_step=4)
    assert explicit.resolve("cpu", 8).loop_collectives == "on" and explicit.resolve("cpu", 8).vision_frames_per_step == 4
    assert cpu8.resolve("cpu", 8) == cpu8
    with pytest.raises(ConfigError, match="platform"):
        cfg.resolve("cuda", 1)
    with pytest.raises(UnresolvedExecution, match="compute_dtype, vision_frames_per_step, loop_collectives, platform"):
        ResolvedExecution()  # only resolve() (or every choice spelled out) makes one


def test_resolve_execution_reads_the_mesh_devices():
    _, cfg = preset_configs("tiny")
    assert resolve_execution(cfg) == cfg.resolve("cpu", 1)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert resolve_execution(cfg, mesh).loop_collectives == "off"
    assert resolve_execution(cfg, make_mesh(devices=jax.devices()[:1])).loop_collectives == "on"


def test_traced_entries_refuse_unresolved_execution_naming_the_auto_fields():
    """What `load_pretrained(...).execution` holds ("auto" choices) runs nowhere without being resolved: before, a
    config straight from a model directory passed to make_train_step built a 2.9x slower graph without a word."""
    import optax

    from llavaction_jax.api import forward_with_losses
    from llavaction_jax.model import decode
    from llavaction_jax.train.step import make_train_step

    cfg, unresolved = load_preset("tiny"), ExecutionConfig(compute_dtype="float32")
    ids, mask = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), bool)
    calls = [
        ("make_train_step", lambda: make_train_step(cfg, unresolved, optax.sgd(0.1), {})),
        ("llava.forward", lambda: llava.forward({}, cfg, unresolved, ids, None)),
        ("llava.forward", lambda: forward_with_losses({}, ids, None, mask, None, None, cfg=cfg, execution=unresolved)),
        ("decode.generate", lambda: decode.generate({}, cfg, unresolved, decode.GenerationConfig(), ids, None, mask)),
        ("decode.score_options", lambda: decode.score_options({}, cfg, unresolved, ids, None, mask,
                                                              jnp.ones((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3), bool))),
    ]
    for where, call in calls:
        with pytest.raises(UnresolvedExecution, match=rf"{where} needs execution choices resolved .*still auto: "
                           r"vision_frames_per_step=0, loop_collectives='auto', platform='auto'\)"):
            call()
    with pytest.raises(TypeError, match="takes a ResolvedExecution, got ModelConfig"):
        llava.forward({}, cfg, cfg, ids, None)


def test_traced_code_never_asks_for_the_backend_or_a_global_mesh():
    sources = [*sorted((ROOT / "llavaction_jax" / "model").glob("*.py")), ROOT / "llavaction_jax" / "sharding.py",
               ROOT / "llavaction_jax" / "losses.py"]
    for file in sources:
        text = file.read_text()
        for pattern in ("default_backend", "_ACTIVE_MESH", "CPU_MESH_FALLBACK"):
            assert pattern not in text, f"{file.name} mentions {pattern}"


def test_constrain_uses_the_context_mesh_and_is_a_no_op_without_one():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    fn = jax.jit(lambda x: constrain(x * 2, ("batch", "act_heads")))
    x = jnp.ones((8, 4))
    with use_mesh(mesh):
        placed = fn(x)
    assert placed.sharding.spec == P(("data", "fsdp"), "tensor")
    assert len(fn(x).sharding.device_set) == 1  # no context mesh: no constraint


def test_shard_batch_splits_rows_and_names_the_axes_when_they_do_not_divide():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    arrays = shard_batch({"ids": np.arange(8 * 3).reshape(8, 3), "mask": np.ones((8,), bool)}, mesh)
    assert arrays["ids"].sharding == batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["ids"]), np.arange(24).reshape(8, 3))
    with pytest.raises(ValueError, match=r"batch of 6 rows does not split over mesh axes data x fsdp = 4 .*tensor"):
        shard_batch({"ids": np.zeros((6, 3))}, mesh)


def test_param_shardings_log_each_replicated_dimension(caplog):
    cfg = load_preset("tiny", {"text.vocab_size": 511})  # 511 rows do not split over tensor=2
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with caplog.at_level(logging.INFO, logger="llavaction_jax.sharding"):
        shardings = param_shardings(llava.param_specs(cfg), mesh)
    assert shardings["text"]["embed"].spec == P(None, "fsdp")
    assert shardings["text"]["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    replicated = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert any("text/embed" in m and "size 511" in m for m in replicated), replicated
    assert not any("mlp" in m for m in replicated), replicated


def test_print_config_shows_every_model_field_with_overrides():
    out = subprocess.run([sys.executable, "-m", "llavaction_jax", "train", "--config", "configs/train.py",
                          "--config.model.loss_chunk_tokens=0", "--config.model.compute_dtype=bfloat16",
                          "--config.model.text.num_layers=3", "--print-config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = out.stdout[out.stdout.index("\nmodel:"):]
    for field in [*ModelConfig.__dataclass_fields__, *EXECUTION_FIELDS]:
        if field != "extra":
            assert re.search(rf"^  {field}:", model, re.M), field
    assert re.search(r"^  loss_chunk_tokens: 0$", model, re.M)
    assert re.search(r"^  compute_dtype: bfloat16$", model, re.M)
    assert re.search(r"^    num_layers: 3$", model, re.M)
    bad = subprocess.run([sys.executable, "-m", "llavaction_jax", "train", "--config.model.attention=fast",
                          "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "attention" in bad.stderr and "Traceback" not in bad.stderr


def test_recipe_model_section_builds_the_model_config_and_the_execution_choices():
    from llavaction_jax.recipes import execution_config, load_recipe, model_config

    cfg = load_recipe("train", ["--config.model.preset=llavaction_0_5b", "--config.model.remat_policy=full",
                                "--config.model.vision_frames_per_step", "-1", "--config.model.text.num_layers=3"])
    preset, execution = preset_configs("llavaction_0_5b")
    assert model_config(cfg) == preset.replace(text=dataclasses.replace(preset.text, num_layers=3))
    assert execution_config(cfg) == execution.replace(remat_policy="full", vision_frames_per_step=-1)
    assert execution.compute_dtype == "bfloat16"  # the preset's own choice travels with it


def test_unrolled_layers_and_vision_steps_give_the_same_outputs_and_gradients():
    """`scan_layers=False` unrolls the decoder's layer loop, `vision_frames_per_step` sets how many frames each
    vision step encodes (execution.md: the demo's CPU step runs both unrolled / at once); the hidden states, the
    heads' gathered states and the gradients are the same in every combination."""
    cfg = load_preset("tiny")
    params = jax.jit(lambda k: llava.init(cfg, k))(jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.text.vocab_size, (2, 12)).astype(np.int32)
    ids[:, 3] = -200  # the video placeholder
    size = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (2, 2, 3, size, size)).astype(np.float32)
    mask = np.ones(ids.shape, bool)
    mask[1, 9:] = False  # a padded row

    def outputs(scan, frames_per_step):  # 2 frames of the batch a step: a two-step loop over each video's 2; -1: one
        execution = ExecutionConfig(scan_layers=scan, vision_frames_per_step=frames_per_step).resolve("cpu", 1)

        def f(p):
            out = llava.forward(p, cfg, execution, ids, pixels, mask)
            score = jnp.sum(jnp.where(out.valid[..., None], out.hidden, 0) ** 2) + jnp.sum(out.action_states ** 2)
            return score, (out.hidden, out.action_states)
        (_, states), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return states, grads

    (hidden, heads), grads = outputs(True, 2)
    assert heads.shape[0] == cfg.text.num_layers + 1
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["text"]["layers"]))
    for scan, frames_per_step in ((False, 2), (False, -1)):
        (hidden_u, heads_u), grads_u = outputs(scan, frames_per_step)
        np.testing.assert_allclose(hidden_u, hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(heads_u, heads, rtol=1e-5, atol=1e-5)
        for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(grads), zip(jax.tree.leaves(grads_u),
                                                                                jax.tree.leaves(grads))):
            # fp32 summation order only: within 1e-5 of each gradient's largest entry (the key biases' are 0 up to
            # noise)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max() + 1e-6,
                                       err_msg=f"{scan}, {frames_per_step}: {jax.tree_util.keystr(path[0])}")
