"""Execution choices are config fields resolved once at the entry point; the mesh is JAX's context mesh; batches
and parameters are placed by one helper each; every model field is settable from the command line."""

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

from llavaction_jax.config import AUTO_CPU_FRAMES_PER_STEP, ConfigError, ModelConfig, load_preset
from llavaction_jax.model import llava
from llavaction_jax.sharding import (batch_sharding, constrain, make_mesh, param_shardings, resolve_config,
                                     shard_batch, use_mesh)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_resolution_depends_on_platform_and_mesh_size_only():
    cfg = ModelConfig()
    cpu1, cpu8, gpu8, tpu4 = (cfg.resolved(p, n) for p, n in (("cpu", 1), ("cpu", 8), ("gpu", 8), ("tpu", 4)))
    assert (cpu1.platform, cpu1.loop_collectives, cpu1.vision_frames_per_step) == ("cpu", "on", AUTO_CPU_FRAMES_PER_STEP)
    # several CPU devices: no sharded work inside loops or conditionals, every frame at once
    assert (cpu8.loop_collectives, cpu8.vision_frames_per_step) == ("off", -1)
    assert (gpu8.platform, gpu8.loop_collectives, gpu8.vision_frames_per_step) == ("gpu", "on", -1)
    assert (tpu4.platform, tpu4.loop_collectives) == ("tpu", "on")
    # explicit choices are kept; resolving twice changes nothing
    explicit = cfg.replace(loop_collectives="on", vision_frames_per_step=4)
    assert explicit.resolved("cpu", 8).loop_collectives == "on" and explicit.resolved("cpu", 8).vision_frames_per_step == 4
    assert cpu8.resolved("cpu", 8) == cpu8
    with pytest.raises(ConfigError, match="platform"):
        cfg.resolved("cuda", 1)


def test_resolve_config_reads_the_mesh_devices():
    cfg = load_preset("tiny")
    assert resolve_config(cfg) == cfg.resolved("cpu", 1)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert resolve_config(cfg, mesh).loop_collectives == "off"
    assert resolve_config(cfg, make_mesh(devices=jax.devices()[:1])).loop_collectives == "on"


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
    for field in ModelConfig.__dataclass_fields__:
        if field != "extra":
            assert re.search(rf"^  {field}:", model, re.M), field
    assert re.search(r"^  loss_chunk_tokens: 0$", model, re.M)
    assert re.search(r"^  compute_dtype: bfloat16$", model, re.M)
    assert re.search(r"^    num_layers: 3$", model, re.M)
    bad = subprocess.run([sys.executable, "-m", "llavaction_jax", "train", "--config.model.attention=fast",
                          "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "attention" in bad.stderr and "Traceback" not in bad.stderr


def test_recipe_model_section_builds_the_model_config():
    from llavaction_jax.recipes import load_recipe, model_config

    cfg = load_recipe("train", ["--config.model.preset=llavaction_0_5b", "--config.model.remat_policy=full",
                                "--config.model.vision_frames_per_step", "-1"])
    model = model_config(cfg)
    assert model == load_preset("llavaction_0_5b").replace(remat_policy="full", vision_frames_per_step=-1)
