"""The vision-tower registry is the one point of extension: a second tower, written here as one module (this file's
`param_specs` / `encode`) plus one entry (`TOY`), runs through the model, the converter's key tables (upstream and
HF spellings, unused keys, layers past the selected one), the config.json readers and writers, and the frame
preprocessing, with no other file touched. Also: how a tower name finds its tower."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from _convert_fixtures import upstream_config
from llavaction_jax import vision_towers
from llavaction_jax.config import ExecutionConfig, load_preset, tower_vision
from llavaction_jax.convert import hf_onevision, import_plan, keys, upstream_config as uc
from llavaction_jax.data.image import preprocess_frames
from llavaction_jax.model import llava, projector, siglip
from llavaction_jax.model.params import ParamSpec, dense, stacked
from llavaction_jax.model.video import layout_tokens, pool_features
from llavaction_jax.train import optim
from llavaction_jax.tree import flatten_paths
from llavaction_jax.vision_towers import Preprocessing, VisionTower

TOY_NAME = "example/toy-tower-8px"


# ------------------------------------------------------------------ the toy tower's module (this file)
def param_specs(cfg):
    """Patches -> stem -> residual tanh mixing layers: small, but with a stacked layer axis and a conv-free stem."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    return {"stem": dense(p * p * c, d, None, "embed"),
            "blocks": stacked(cfg.num_layers, {"mix": dense(d, d, "embed", "mlp", bias=False)}),
            "gain": ParamSpec((d,), ("embed",))}


def encode(params, pixels, cfg, *, dtype=jnp.float32, remat_policy="none", attn_impl="xla", platform="auto"):
    x = siglip.patchify(pixels.astype(dtype), cfg.patch_size) @ params["stem"]["kernel"] + params["stem"]["bias"]
    x, _ = jax.lax.scan(lambda h, p: (h + jnp.tanh(h @ p["mix"]["kernel"]), None), x, params["blocks"])
    return x * params["gain"]


def toy_features(params, pixels, cfg) -> np.ndarray:
    """The toy tower in numpy, written apart from `encode`: what the model must have consumed."""
    n, c, h, w = pixels.shape
    p = cfg.patch_size
    patches = pixels.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
    x = patches @ np.asarray(params["stem"]["kernel"]) + np.asarray(params["stem"]["bias"])
    for layer in np.asarray(params["blocks"]["mix"]["kernel"]):
        x = x + np.tanh(x @ layer)
    return x * np.asarray(params["gain"])


# ------------------------------------------------------------------ the toy tower's entry
TOY = VisionTower(
    family="toy", title="Toy", module=__name__, claims="toy-tower",
    sizes={TOY_NAME: dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=16,
                          patch_size=8)},
    config_keys=(("hidden_size", "width", 32), ("intermediate_size", "mlp_width", 64), ("num_layers", "depth", 3),
                 ("num_heads", "heads", 2), ("image_size", "image_size", 16), ("patch_size", "patch", 8)),
    hf_model_type="toy_vision_model", hf_config={"hidden_act": "tanh"},
    upstream_prefix="model.vision_tower.toy.", hf_prefix="vision_tower.toy.",
    source_prefixes=(r"(?:model\.)?vision_tower\.toy\.",),
    key_rules=(("stem.weight", "stem/kernel", "transpose"), ("stem.bias", "stem/bias", "same"),
               ("blocks.{i}.mix.weight", "blocks/mix/kernel", "transpose"), ("gain", "gain", "same")),
    unused_keys=((r"final_norm\.", "the toy's final norm, never applied"),),
    layer_key=r"blocks\.(\d+)\.",
    hf_identity_tensors=(("final_norm.weight", 1.0),),
    no_weight_decay=(r"gain$",),  # as if it were a LayerNorm scale
    preprocessing=Preprocessing(resample="bilinear", rescale=1 / 255, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(vision_towers, "TOWERS", dict(vision_towers.TOWERS))  # registered for this test only
    vision_towers.register(TOY)
    cfg = load_preset("tiny").replace(vision_tower=TOY_NAME, vision=tower_vision(TOY_NAME, select_layer=-2))
    return cfg, llava.init(cfg, jax.random.key(0))


def test_the_toy_tower_runs_in_the_model(toy):
    cfg, params = toy
    assert cfg.vision.num_layers == 2  # the select-layer rule on the entry's 3-layer size
    assert set(flatten_paths(params["vision"])) == {"stem/kernel", "stem/bias", "blocks/mix/kernel", "gain"}
    execution = ExecutionConfig().resolve("cpu", 1)
    pixels = jax.random.uniform(jax.random.key(1), (2, 3, 3, 16, 16), minval=-1, maxval=1)
    tokens = jax.jit(llava.encode_videos, static_argnums=(2, 3))(params, pixels, cfg, execution)
    feats = toy_features(params["vision"], np.asarray(pixels).reshape(6, 3, 16, 16), cfg.vision)
    pooled = pool_features(projector.project(params["projector"], jnp.asarray(feats)), cfg)
    expected = jax.vmap(lambda f: layout_tokens(f, params, cfg))(pooled.reshape(2, 3, *pooled.shape[1:]))
    np.testing.assert_allclose(tokens, expected, atol=1e-5)
    ids = jnp.array([[1, 2, llava.IMAGE_TOKEN_INDEX, 3, 4]] * 2)
    out = jax.jit(llava.forward, static_argnums=(1, 2))(params, cfg, execution, ids, pixels)
    assert out.hidden.shape == (2, 4 + cfg.tokens_per_video(3), cfg.text.hidden_size)
    assert bool(jnp.isfinite(out.hidden).all())


def _torch_state(params, cfg, tower, rename=lambda k: k) -> dict:
    """Our params written as a PyTorch state dict through the key table (upstream spelling, or `rename`d)."""
    flat = flatten_paths(params)
    state = {}
    for key, path, layer, transform in keys.expected_keys(flatten_paths(llava.param_specs(cfg)), tower):
        array = np.asarray(flat[path] if layer is None else flat[path][layer])
        state[rename(key)] = keys.to_torch(array, transform)
    return state


def test_the_toy_tower_converts_both_ways(toy):
    cfg, params = toy
    names = list(keys.upstream_keys(cfg))
    vision = [k for k in names if k.startswith(TOY.upstream_prefix)]
    assert vision == ["model.vision_tower.toy.stem.weight", "model.vision_tower.toy.stem.bias",
                      "model.vision_tower.toy.blocks.0.mix.weight", "model.vision_tower.toy.blocks.1.mix.weight",
                      "model.vision_tower.toy.gain"]
    assert names.index(vision[0]) > names.index("model.norm.weight") and names.index(vision[-1]) < names.index(
        "model.mm_projector.0.weight")  # the tower's tensors where upstream's state dict keeps them
    state = _torch_state(params, cfg, TOY)
    assert state["model.vision_tower.toy.stem.weight"].shape == (32, 8 * 8 * 3)  # torch [out, in]
    extra = {"model.vision_tower.toy.final_norm.weight": np.ones(32, np.float32),  # never applied
             "model.vision_tower.toy.blocks.2.mix.weight": np.ones((32, 32), np.float32)}  # past the selected layer
    plan = import_plan.plan_conversion(flatten_paths(llava.param_specs(cfg)),
                                       import_plan.ArrayTensors({**state, **extra}), cfg)
    assert plan.problems == []
    assert dict(plan.skipped) == {"model.vision_tower.toy.final_norm.weight": "the toy's final norm, never applied",
                                  "model.vision_tower.toy.blocks.2.mix.weight":
                                      "Toy layer past mm_vision_select_layer (upstream deletes it)"}
    back = import_plan.torch_to_params(state, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    # the HF llava-onevision spelling, for a model that layout can hold (one newline per video, no heads)
    hf_cfg = cfg.replace(newline_position="one_token", vision_supervision=None, action_types=())
    hf_onevision.check_exportable(hf_cfg)
    hf_params = llava.init(hf_cfg, jax.random.key(2))
    hf_state = _torch_state(hf_params, hf_cfg, TOY, lambda k: hf_onevision.hf_key(k, TOY))
    assert "vision_tower.toy.blocks.1.mix.weight" in hf_state
    back = import_plan.torch_to_params(hf_state, hf_cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, hf_params))
    assert hf_onevision.identity_tensors(cfg) == {"vision_tower.toy.final_norm.weight": ((32,), 1.0)}


def test_the_toy_tower_in_config_json(toy):
    cfg, _ = toy
    raw = dict(upstream_config(cfg, TOY_NAME, "float32"), mm_hidden_size=32)
    read = uc.from_upstream(raw)  # the tower's size by hub name, no download
    assert read.vision == cfg.vision and read.vision_tower == TOY_NAME
    assert uc.to_upstream(read)["mm_vision_tower"] == TOY_NAME
    hub = {"model_type": "toy_vision_model", "width": 32, "depth": 5, "patch": 4}  # the entry's keys and defaults
    other = uc.from_upstream(dict(raw, mm_vision_tower="org/my-toy-tower"), vision=hub)
    assert (other.vision.num_layers, other.vision.patch_size, other.vision.image_size) == (4, 4, 16)
    hf = hf_onevision.hf_config(cfg)["vision_config"]
    assert hf == {"model_type": "toy_vision_model", "width": 32, "mlp_width": 64, "depth": 2, "heads": 2,
                  "image_size": 16, "patch": 8, "hidden_act": "tanh"}
    assert uc.vision_from_hf(hf, select_layer=-1) == cfg.vision
    # a toy model not of its named checkpoint's size: its hub config travels in mm_vision_config, in the entry's keys
    odd = read.replace(vision=dataclasses.replace(read.vision, hidden_size=16, intermediate_size=24))
    written = json.loads(json.dumps(uc.export_config(odd)))
    assert written[uc.VISION_CONFIG_KEY] == {"model_type": "toy_vision_model", "width": 16, "mlp_width": 24,
                                             "depth": 3, "heads": 2, "image_size": 16, "patch": 8}
    assert uc.from_upstream(written).vision == odd.vision
    assert uc.VISION_CONFIG_KEY not in uc.export_config(read)  # its name gives its size
    processor = hf_onevision.processor_configs(cfg)["preprocessor_config.json"]
    assert (processor["resample"], processor["image_mean"], processor["image_std"]) == (2, [0.4, 0.5, 0.6],
                                                                                     [0.2, 0.25, 0.3])


def test_weight_decay_skips_each_towers_layer_norms(toy):
    cfg, params = toy
    siglip_params = llava.init(load_preset("tiny"), jax.random.key(0))
    decays = {**flatten_paths(optim.decay_mask(params)), **flatten_paths(optim.decay_mask(siglip_params))}
    assert not decays["vision/gain"] and decays["vision/stem/kernel"] and not decays["vision/stem/bias"]
    assert not decays["vision/layers/ln1/scale"] and not decays["vision/layers/ln2/bias"]
    assert decays["vision/layers/attn/q/kernel"] and decays["text/layers/input_norm/scale"]  # Qwen2RMSNorm is no nn.LayerNorm


def test_the_toy_towers_preprocessing(toy):
    frames = np.random.default_rng(0).integers(0, 256, (2, 20, 12, 3), dtype=np.uint8)
    got = preprocess_frames(frames, 16, TOY.preprocessing)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((16, 16), Image.Resampling.BILINEAR)) for f in frames])
    scaled = (resized.astype(np.float64) / 255).astype(np.float32)
    want = (scaled - np.float32([0.4, 0.5, 0.6])) / np.float32([0.2, 0.25, 0.3])
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), rtol=1e-6)


def test_a_tower_name_finds_its_tower(toy):
    assert vision_towers.lookup("google/siglip-so400m-patch14-384") is vision_towers.SIGLIP
    assert vision_towers.lookup("/models/my-siglip-copy") is vision_towers.SIGLIP  # upstream: "siglip" in the name
    assert vision_towers.lookup("org/name") is vision_towers.SIGLIP  # claimed by no entry: the default tower
    assert vision_towers.lookup(TOY_NAME) is TOY and vision_towers.lookup("toy") is TOY
    assert vision_towers.by_hf_model_type("toy_vision_model") is TOY
    with pytest.raises(ValueError, match="already registered"):
        vision_towers.register(TOY)
    with pytest.raises(ValueError, match="already belong"):
        vision_towers.register(dataclasses.replace(TOY, family="toy2"))


def test_every_registered_tower_has_its_module():
    for tower in vision_towers.TOWERS.values():
        cfg = load_preset("tiny").replace(vision_tower=next(iter(tower.sizes)))
        module = llava.tower_module(cfg)
        assert module.__name__ == tower.module and callable(module.param_specs) and callable(module.encode)
