"""Fine-tuning LLaVA-Video into LLaVAction: `model.init_from` a checkpoint without the action token and heads, with
a config that has them. The stored parameters are restored exactly, the new parts start from the random init (as
upstream builds them at construction), and anything else that does not match is refused by name."""

import jax
import numpy as np
import pytest

from llavaction_jax.api import LlavaModel
from llavaction_jax.config import ConfigError, load_preset
from llavaction_jax.model import llava
from llavaction_jax.recipes import load_recipe, model_config
from llavaction_jax.sharding import make_mesh, param_shardings
from llavaction_jax.train.loop import initial_params

VIDEO_ONLY = load_preset("tiny").replace(vision_supervision=None)  # a LLaVA-Video-like source: no token, no heads


@pytest.fixture(scope="module")
def llava_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_video") / "model"
    model = LlavaModel.random(VIDEO_ONLY, seed=3)
    model.save_pretrained(path)
    return path, jax.device_get(model.params)


def _params(path, *overrides):
    cfg = load_recipe("train", [f"--config.model.init_from={path}", *overrides])
    model_cfg = model_config(cfg)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    logged = []
    params = initial_params(cfg, model_cfg, param_shardings(llava.param_specs(model_cfg), mesh), logged.append)
    return model_cfg, jax.device_get(params), logged


def test_llava_video_checkpoint_gains_the_action_token_and_heads(llava_video):
    path, stored = llava_video
    cfg, params, logged = _params(path, "--config.model.vision_supervision=one_token",
                                  "--config.model.vision_token_training=last_layer")
    assert "action_tokens" not in stored and "heads" not in stored
    assert params["action_tokens"].shape == (1, cfg.text.hidden_size)
    assert {k: v["kernel"].shape for k, v in params["heads"].items()} == {
        "verb": (cfg.text.hidden_size, 8), "noun": (cfg.text.hidden_size, 8), "action": (cfg.text.hidden_size, 16)}
    # upstream's new nn.Linear heads: transformers' _init_weights, N(0, initializer_range = 0.02)
    assert all(0.018 < np.std(v["kernel"]) < 0.022 and abs(np.mean(v["kernel"])) < 0.004
               for v in params["heads"].values())
    for (p, want), got in zip(jax.tree_util.tree_leaves_with_path(stored), jax.tree.leaves(
            {k: params[k] for k in stored})):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(p))
    assert len(logged) == 1 and "action_tokens, heads" in logged[0]


def test_same_config_restores_without_new_parts(llava_video):
    path, stored = llava_video
    _, params, logged = _params(path)
    assert sorted(params) == sorted(stored) and not logged


def test_a_mismatched_checkpoint_is_refused_by_name(llava_video):
    path, _ = llava_video
    with pytest.raises(ConfigError, match=r"parameter text/layers/\S+ has shape \(2, .*needs \(3, "):
        _params(path, "--config.model.text.num_layers=3")  # layers are stacked: a leading axis of 2, not 3
    with pytest.raises(ConfigError, match=r"parameter projector/\S+ is missing, the model config needs"):
        _params(path, "--config.model.projector_type=mlp3x_gelu")
    with pytest.raises(ConfigError, match=r"parameter text/embed has shape \(512, 128\), the model config needs "
                                          r"\(600, 128\)"):
        _params(path, "--config.model.text.vocab_size=600")
