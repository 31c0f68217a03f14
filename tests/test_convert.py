"""Checkpoint conversion: HF llava-onevision parity, upstream-layout round trips, and errors that name the keys."""

import dataclasses
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from _convert_fixtures import (make_upstream_checkpoint, tiny_cfg, upstream_config, upstream_tensors, write_checkpoint,
                               write_vision_tower)
from safetensors.numpy import load_file, save_file

import llavaction_jax
from _cli_e2e import run_cli
from llavaction_jax.cli import main
from llavaction_jax.config import ConfigError
from llavaction_jax.convert import from_torch, to_torch
from llavaction_jax.convert.hf_onevision import grid_pinpoints, processor_files
from llavaction_jax.convert.keys import ConversionError
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint, SafetensorsError
from llavaction_jax.tree import flatten_paths

TOL = 1e-4


def leaves(model) -> dict:
    return {k: np.asarray(v) for k, v in flatten_paths(model.params).items()}


def read_exported(directory: pathlib.Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))  # the official reader, not ours
    return out


# ------------------------------------------------------------------------------ HF llava-onevision parity
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    import torch
    from test_parity_hf import SIGLIP, qwen2_config, randomise
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    hf_cfg = LlavaOnevisionConfig(
        text_config=qwen2_config(False), vision_config=SiglipVisionConfig(num_hidden_layers=2, **SIGLIP),
        image_token_index=300, video_token_index=301, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomise(LlavaOnevisionForConditionalGeneration(hf_cfg))
    src = tmp_path_factory.mktemp("hf") / "llava-ov-tiny"
    model.save_pretrained(src)
    return model, src


def hf_logits(model, before, after, pixels, n_video):
    import torch

    ids = np.concatenate([before, np.full((len(before), n_video), 301), after], axis=1)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(pixels)).logits.numpy()


def test_hf_onevision_import_matches_transformers_and_exports_back(hf_checkpoint, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    model, src = hf_checkpoint
    assert main(["convert", "from-torch", str(src), "--out", str(tmp_path / "ours"), "--no-progress"]) == 0
    ours = llavaction_jax.load_pretrained(tmp_path / "ours")
    assert ours.cfg.newline_position == "one_token" and ours.cfg.param_dtype == "float32"
    assert (tmp_path / "ours" / "config.json").read_text() == (src / "config.json").read_text()
    assert (tmp_path / "ours" / "generation_config.json").is_file()
    # the key list derived from our specs + rules is exactly what transformers holds (less what LLaVA never reads)
    from llavaction_jax.convert.keys import is_unused, normalise_key, upstream_keys

    hf_keys = [normalise_key(k) for k in model.state_dict()]
    assert set(upstream_keys(ours.cfg)) == {k for k in hf_keys if not is_unused(k, ours.cfg)}

    rng = np.random.default_rng(2)
    frames, n_video = 3, ours.cfg.tokens_per_video(3)
    before, after = rng.integers(0, 300, size=(2, 5)), rng.integers(0, 300, size=(2, 4))
    pixels = rng.uniform(-1, 1, size=(2, frames, 3, 32, 32)).astype(np.float32)
    ref = hf_logits(model, before, after, pixels, n_video)
    ids = np.concatenate([before, np.full((2, 1), -200), after], axis=1)
    logits = np.asarray(ours(ids, pixels).logits)
    assert logits.shape == ref.shape and np.abs(logits - ref).max() <= TOL

    in_memory = llavaction_jax.load_pretrained(src)  # a torch directory converts on the fly
    assert all(np.array_equal(a, leaves(ours)[k]) for k, a in leaves(in_memory).items())

    assert main(["convert", "to-torch", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"),
                 "--layout", "hf-onevision", "--no-progress"]) == 0
    back, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(hf_logits(back.eval(), before, after, pixels, n_video), ref)


# --------------------------------------------------------------------------- upstream layout round trips
VARIANTS = {  # name: (heads + action token, tied embeddings, dtype, unused keys present)
    "llavaction-7b-like": (True, False, "float32", True),
    "llava-video-no-heads-bf16": (False, False, "bfloat16", False),
    "llavaction-0.5b-like-tied-bf16": (True, True, "bfloat16", True),
    "no-heads-tied-fp16": (False, True, "float16", False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_upstream_import_export_is_byte_identical(variant, tmp_path):
    heads, tied, dtype, unused = VARIANTS[variant]
    config, tensors = make_upstream_checkpoint(tmp_path / "src", heads=heads, tied=tied, dtype=dtype, unused=unused)
    report = from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    assert report.cfg.param_dtype == dtype and report.cfg.newline_position == "grid"
    assert ("heads/verb/kernel" in report.plan.params) == ("action_tokens" in report.plan.params) == heads
    skipped = {k for k, _ in report.plan.skipped}
    assert bool(skipped) == unused and all("post_layernorm" in k or "layers.2." in k for k in skipped)
    files = to_torch.export_checkpoint(tmp_path / "ours", tmp_path / "back", max_shard_bytes=200_000, progress=False)
    assert len(files) > 1 and (tmp_path / "back" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())

    back = read_exported(tmp_path / "back")
    assert set(back) == set(tensors) - skipped == set(index["weight_map"])
    for key, value in back.items():
        assert value.dtype == tensors[key].dtype and value.shape == tensors[key].shape, key
        assert value.tobytes() == tensors[key].tobytes(), key
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: exported.get(k, "<dropped>") for k in config} == config
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()


def trainable_configs():
    """Every model the project can train: the presets (the released sizes, the tiny one), the demo's tiny variant
    (8 px patches) and the other supervision layouts."""
    from llavaction_jax.config import available_presets, preset_configs

    configs = {name: preset_configs(name)[0] for name in available_presets()}
    tiny = configs["tiny"]
    configs["tiny_demo"] = tiny.replace(vision=dataclasses.replace(tiny.vision, patch_size=8))
    configs["tiny_three_tokens"] = tiny.replace(vision_supervision="three_tokens")
    configs["tiny_video_only"] = tiny_cfg(heads=False)
    return configs


def test_every_trainable_model_config_survives_its_export_config():
    """The export's config.json (upstream's keys) gives back the model config, the vision tower's real size included
    (the tiny preset names so400m but is 64 wide: its size travels in mm_vision_config)."""
    from llavaction_jax.convert.upstream_config import VISION_CONFIG_KEY, export_config, from_upstream

    for name, cfg in trainable_configs().items():
        exported = json.loads(json.dumps(export_config(cfg)))  # through JSON, as written
        back = from_upstream(exported)
        assert back.replace(param_dtype=cfg.param_dtype) == cfg, name  # the dtype comes from the tensors
        assert (VISION_CONFIG_KEY in exported) == name.startswith("tiny"), name  # released towers: by name only


@pytest.mark.cli_e2e("convert to-torch", "convert from-torch")
def test_a_trained_model_exports_and_comes_back(tmp_path, capsys):
    """`convert to-torch RUN/model --out exp`, then `convert from-torch exp --check`, `load_pretrained(exp)` and
    `convert from-torch exp --out back` all work without a --vision-config, and give back the same model."""
    from transformers import Qwen2Config

    from llavaction_jax.api import LlavaModel

    cfg = trainable_configs()["tiny_demo"]
    model = LlavaModel.random(cfg, seed=3)
    model.save_pretrained(tmp_path / "trained")  # as `train` writes RUN/model
    assert run_cli(["convert", "to-torch", str(tmp_path / "trained"), "--out", str(tmp_path / "exp"),
                    "--no-progress"]) == 0
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["architectures"] == ["LlavaQwenForCausalLM"] and config["mm_newline_position"] == "grid"
    assert config["vision_supervision"] == "one_token" and config["torch_dtype"] == "float32"
    assert config["mm_vision_config"]["patch_size"] == 8 and config["mm_hidden_size"] == 64
    # upstream's loader reads its config through transformers' Qwen2Config (LlavaQwenConfig subclasses it): the
    # extra key is kept as a plain attribute, and the Qwen2 fields are the model's
    hf = Qwen2Config.from_pretrained(str(tmp_path / "exp"))
    assert hf.hidden_size == cfg.text.hidden_size and hf.mm_vision_config["hidden_size"] == 64
    assert run_cli(["convert", "from-torch", str(tmp_path / "exp"), "--check"]) == 0  # 1 when it finds problems
    again = llavaction_jax.load_pretrained(tmp_path / "exp")
    assert again.cfg == model.cfg
    assert all(np.array_equal(a, leaves(again)[k]) for k, a in leaves(model).items())
    assert run_cli(["convert", "from-torch", str(tmp_path / "exp"), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    back = llavaction_jax.load_pretrained(tmp_path / "back")
    # execution choices are ours, not upstream keys: a converted checkpoint computes in "auto" precision
    assert back.cfg == model.cfg and back.execution.compute_dtype == "auto"
    assert all(np.array_equal(a, leaves(back)[k]) for k, a in leaves(model).items())


def test_the_hf_onevision_layout_says_the_same_in_its_help_and_its_refusal(tmp_path, capsys):
    from llavaction_jax.api import LlavaModel
    from llavaction_jax.convert.hf_onevision import LIMITS

    with pytest.raises(SystemExit):
        main(["convert", "to-torch", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    LlavaModel.random(tiny_cfg(heads=True), seed=0).save_pretrained(tmp_path / "trained")
    assert main(["convert", "to-torch", str(tmp_path / "trained"), "--out", str(tmp_path / "hf"), "--layout",
                 "hf-onevision"]) == 2
    refusal = " ".join(capsys.readouterr().err.split())
    assert LIMITS in help_text and LIMITS[1:] in refusal  # the refusal starts the sentence with a capital
    assert "action token" in LIMITS and "heads" in LIMITS and "one_token models only" not in help_text
    assert not (tmp_path / "hf").exists()


def upstream_reference_logits(export: pathlib.Path, ids: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Upstream LLaVAction's forward for one sample, rebuilt from an export's files alone with transformers modules
    and torch ops (llavaction/model/llava_arch.py: encode_images, get_2dPool, add_token_per_grid,
    prepare_inputs_labels_for_multimodal): SigLIP up to the selected layer, mlp2x_gelu, bilinear pooling to
    ceil(g/2), a newline after every pooled row, the action token after the video, spliced at the -200."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    config = json.loads((export / "config.json").read_text())
    sd = {k: torch.from_numpy(np.array(v)) for k, v in read_exported(export).items()}
    vision_prefix = "model.vision_tower.vision_tower.vision_model."  # transformers 5 names them without it
    vision = {k[len(vision_prefix):]: v for k, v in sd.items() if k.startswith(vision_prefix)}
    width = vision["embeddings.patch_embedding.weight"].shape
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=width[0], patch_size=width[-1], image_size=pixels.shape[-1], vision_use_head=False,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0], num_attention_heads=4,
        num_hidden_layers=len({k.split(".")[2] for k in vision if ".layers." in k}), layer_norm_eps=1e-6)).eval()
    missing, unexpected = tower.load_state_dict(vision, strict=False)
    assert set(missing) == {"post_layernorm.weight", "post_layernorm.bias"} and not unexpected, (missing, unexpected)
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: config[k] for k in text_keys})).eval()
    llm_sd = {k: v for k, v in sd.items() if k.startswith(("model.embed_tokens", "model.layers.", "model.norm.",
                                                             "lm_head."))}
    missing, unexpected = llm.load_state_dict(llm_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        features = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
        p = "model.mm_projector."
        x = F.linear(F.gelu(F.linear(features, sd[p + "0.weight"], sd[p + "0.bias"])), sd[p + "2.weight"],
                     sd[p + "2.bias"])
        t, n, h = x.shape
        g = int(round(n ** 0.5))
        pooled = F.interpolate(x.view(t, g, g, h).permute(0, 3, 1, 2), size=[(g + 1) // 2] * 2, mode="bilinear",
                               align_corners=False).permute(0, 2, 3, 1)  # (T, h, h, H)
        newline = sd["model.image_newline"].expand(t, pooled.shape[1], 1, h)
        video = torch.cat([pooled, newline], dim=2).reshape(-1, h)
        video = torch.cat([video, sd["model.action_supervision"].reshape(-1, h)])
        place = int(np.flatnonzero(ids == -200)[0])
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.from_numpy(ids[:place])), video, embed(torch.from_numpy(ids[place + 1:]))])
        return llm(inputs_embeds=embeds[None]).logits[0].numpy()


def test_to_torch_export_of_a_trained_model_loads_in_transformers_with_the_same_logits(tmp_path, capsys):
    from transformers import AutoTokenizer, GenerationConfig

    from llavaction_jax.api import LlavaModel
    from llavaction_jax.data.tokenizer import train_chatml_tokenizer

    prompt = "<image>\nWhat action are you doing? A. take cup, B. open door"
    train_chatml_tokenizer([prompt, "You are a helpful assistant. system user assistant"] * 4, 300, tmp_path / "tok")
    import jax

    from llavaction_jax.model import llava

    cfg = tiny_cfg(heads=True, tied=False)  # random weights initialised in jit with rbg keys (fast on CPU)
    model = LlavaModel(cfg, jax.jit(lambda key: llava.init(cfg, key))(jax.random.key(5, impl="rbg")))
    model.save_pretrained(tmp_path / "trained", tokenizer_dir=tmp_path / "tok")  # what `train` writes too
    assert main(["convert", "to-torch", str(tmp_path / "trained"), "--out", str(tmp_path / "torch"), "--no-progress"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "torch" / name).is_file(), name
    config = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert config["mm_use_im_patch_token"] is False  # else upstream's loader adds <im_patch> and grows the vocabulary

    ours = llavaction_jax.load_pretrained(tmp_path / "trained")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "torch"))  # upstream's loader call
    assert len(hf_tokenizer) == len(ours.tokenizer) == 300
    ids = np.asarray(ours.prompt_ids([prompt])[0])
    from llavaction_jax.data.chat import build_inference_prompt, tokenizer_image_token
    assert tokenizer_image_token(build_inference_prompt(prompt), hf_tokenizer) == ids.tolist()
    generation = GenerationConfig.from_pretrained(str(tmp_path / "torch"))
    assert generation.eos_token_id == list(ours.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))

    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    got = np.asarray(ours(ids[None], [pixels]).logits[0])
    np.testing.assert_allclose(got, upstream_reference_logits(tmp_path / "torch", ids, pixels), atol=TOL, rtol=0)

    # HF's llava-onevision has one newline per video and no action token: refused, saying why, nothing written
    assert main(["convert", "to-torch", str(tmp_path / "trained"), "--out", str(tmp_path / "hf"), "--layout",
                 "hf-onevision"]) != 0
    err = capsys.readouterr().err
    assert "mm_newline_position='grid'" in err and "no action token" in err and not (tmp_path / "hf").exists()


def test_hf_onevision_export_of_an_upstream_import_writes_the_processor_files(tmp_path):
    """A model imported from upstream's LLaVA-NeXT layout (as lmms-lab's llava-onevision-qwen2-*-ov) exports with
    the tokenizer, chat template and processor configs transformers' LlavaOnevisionProcessor reads, consistent with
    config.json, and HF's model on the ids they give returns our logits."""
    import torch
    from huggingface_hub.dataclasses import validate_typed_dict
    from PIL import Image
    from transformers import (AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor)
    from transformers.processing_utils import VideosKwargs
    from transformers.video_processing_utils import BaseVideoProcessor

    from llavaction_jax.data.image import preprocess_frames
    from llavaction_jax.data.tokenizer import train_chatml_tokenizer

    cfg = tiny_cfg(heads=False).replace(newline_position="one_token")
    config = upstream_config(cfg, str(write_vision_tower(tmp_path / "siglip")), "float32")
    config.update(mm_newline_position="one_token", image_grid_pinpoints="(1x1),...,(2x3)")  # 64 px tiles
    tensors = {k: (0.1 * v).astype(np.float32) for k, v in upstream_tensors(cfg, "float32").items()}
    write_checkpoint(tmp_path / "src", config, tensors, shards=1)
    train_chatml_tokenizer(["What is the person doing?", "You are a helpful assistant. system user assistant"] * 4,
                           300, tmp_path / "src")  # upstream's directories carry Qwen2's tokenizer, no <image>
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "ours"), "--no-progress"]) == 0
    out = tmp_path / "hf"
    assert main(["convert", "to-torch", str(tmp_path / "ours"), "--out", str(out), "--layout", "hf-onevision",
                 "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())

    # the tokenizer holds <image> / <video> as single special tokens at the ids config.json names
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [300, 301]
    assert (config["image_token_index"], config["video_token_index"]) == (300, 301)  # below vocab_size 512
    assert tokenizer("a<video>b")["input_ids"] == tokenizer("a")["input_ids"] + [301] + tokenizer("b")["input_ids"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "What is the person doing?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>user\n<image>\n<video>\nWhat is the person doing?<|im_end|>\n"
                      "<|im_start|>assistant\n")  # as llava-hf's onevision repos render it

    # the image processor loads (PIL backend: torchvision is not installed here) with the model's size and grid, and
    # its base tile of any image is our frame preprocessing, bit for bit
    image_processor = AutoImageProcessor.from_pretrained(str(out))
    assert image_processor.image_grid_pinpoints == config["image_grid_pinpoints"]
    assert config["image_grid_pinpoints"] == [[64, 64], [64, 128], [64, 192], [128, 64], [128, 128], [128, 192]]
    frame = np.random.default_rng(0).integers(0, 256, (80, 48, 3), dtype=np.uint8)
    pixels = image_processor(images=Image.fromarray(frame), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(pixels[0, 0], preprocess_frames(frame[None], 64)[0])

    # the video processor needs torchvision to build: its settings are checked against the kwargs it accepts, as
    # transformers reads them from the file it looks for
    settings, _ = BaseVideoProcessor.get_video_processor_dict(str(out))
    assert settings.pop("video_processor_type") == "LlavaOnevisionVideoProcessor"
    assert settings.pop("processor_class") == "LlavaOnevisionProcessor"
    validate_typed_dict(VideosKwargs, settings)  # raises on unknown keys or wrong types
    assert settings["size"] == {"height": 64, "width": 64} and settings["image_mean"] == [0.5] * 3

    # the processor's <video> expansion (its own method, on processor_config.json's values) gives our token count,
    # and HF's model fed those ids gives our logits
    processor_config = json.loads((out / "processor_config.json").read_text())
    frames = 3
    video = np.random.default_rng(1).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
    video_pixels = preprocess_frames(video, 64)
    fields = type("ProcessorConfig", (), processor_config)()
    expanded = LlavaOnevisionProcessor.replace_video_token(fields, {"pixel_values_videos": [video_pixels]}, 0)
    assert expanded == "<video>" * cfg.tokens_per_video(frames)
    video_only = [{"role": "user", "content": messages[0]["content"][1:]}]
    text = tokenizer.apply_chat_template(video_only, tokenize=False, add_generation_prompt=True)
    ids = np.asarray(tokenizer(text)["input_ids"])
    ours = np.asarray(llavaction_jax.load_pretrained(tmp_path / "ours")(
        np.where(ids == 301, -200, ids)[None], [video_pixels]).logits[0])
    hf_ids = tokenizer(text.replace("<video>", expanded), return_tensors="pt")["input_ids"]
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values_videos=torch.from_numpy(video_pixels[None])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

    # ids the model has no embedding rows for are refused, naming the tokenizer
    small = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=301))
    with pytest.raises(ConversionError, match=r"src puts <image> / <video> at ids 300 / 301, beyond .* 301 embedding"):
        processor_files(small, tmp_path / "src")


def test_hf_grid_pinpoints_from_upstream_configs():
    cfg = tiny_cfg(heads=False)  # 64 px tiles
    assert grid_pinpoints(cfg.replace(extra={"image_grid_pinpoints": [[384, 768], [768, 384]]})) == [
        [384, 768], [768, 384]]
    assert grid_pinpoints(cfg) == [[64 * i, 64 * j] for i in range(1, 7) for j in range(1, 7)]  # HF's default grid


def write_json(path: pathlib.Path, value) -> pathlib.Path:
    path.write_text(json.dumps(value))
    return path


def test_dtype_cast_and_in_memory_load(tmp_path):
    _, tensors = make_upstream_checkpoint(tmp_path / "src", dtype="bfloat16")
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "fp32"), "--dtype", "float32",
                 "--no-progress"]) == 0
    cast = llavaction_jax.load_pretrained(tmp_path / "fp32")
    assert cast.cfg.param_dtype == "float32"
    up = np.asarray(cast.params["text"]["layers"]["mlp"]["up"]["kernel"])
    assert up.dtype == np.float32
    np.testing.assert_array_equal(up[1], tensors["model.layers.1.mlp.up_proj.weight"].astype(np.float32).T)
    in_memory = llavaction_jax.load_pretrained(tmp_path / "src", dtype="float32")
    assert all(np.array_equal(a, leaves(cast)[k]) for k, a in leaves(in_memory).items())
    kept = llavaction_jax.load_pretrained(tmp_path / "src")
    assert kept.params["text"]["embed"].dtype == ml_dtypes.bfloat16


def test_check_prints_the_mapping_and_writes_nothing(tmp_path, capsys):
    make_upstream_checkpoint(tmp_path / "src", unused=True)
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "upstream layout, 2 file(s)" in out
    assert "text/layers/mlp/up/kernel" in out and "model.layers.{0..1}.mlp.up_proj.weight [transpose]" in out
    assert "heads/action/kernel" in out and "action_head.weight" in out
    assert "skipped model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in out
    assert "deletes it" in out and out.rstrip().endswith("no problems")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "src-siglip"]


def test_refuses_to_overwrite_a_converted_model(tmp_path):
    make_upstream_checkpoint(tmp_path / "src")
    from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    with pytest.raises(FileExistsError, match="refusing"):
        from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)


# ---------------------------------------------------------------------------------- errors name the keys
def _missing(directory, config, tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _unexpected(directory, config, tensors):
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)


def _heads_without_supervision(directory, config, tensors):
    for key in ("vision_supervision", "action_types", "vision_token_training"):
        config.pop(key)


def _shape_mismatch(directory, config, tensors):
    tensors["model.mm_projector.0.weight"] = np.zeros((128, 32), np.float32)


def _unknown_layout(directory, config, tensors):
    config.pop("mm_vision_tower")  # a plain Qwen2 config


def _unknown_model_type(directory, config, tensors):
    config["model_type"] = "llama"


ERRORS = {  # mutation -> (exception, regex the message must match)
    "missing": (_missing, ConversionError, r"missing keys.*model\.layers\.1\.mlp\.up_proj\.weight"),
    "unexpected": (_unexpected, ConversionError, r"unexpected keys.*model\.layers\.0\.mlp\.extra_proj\.weight"),
    "heads-not-in-config": (_heads_without_supervision, ConversionError, r"no vision_supervision.*verb_head\.weight"),
    "shape": (_shape_mismatch, ConversionError,
              r"shape mismatch: 'model\.mm_projector\.0\.weight' in model-0000\d-of-00002\.safetensors is \[128, 32\], "
              r"the config expects \[128, 64\]"),
    "unknown-layout": (_unknown_layout, ConversionError, r"config\.json: unknown layout \(model_type='qwen2'"),
    "unknown-model-type": (_unknown_model_type, ConversionError, r"unknown layout \(model_type='llama'"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_name_the_keys_and_nothing_is_written(case, tmp_path):
    mutate, exc, pattern = ERRORS[case]
    cfg = tiny_cfg()
    config = upstream_config(cfg, str(write_vision_tower(tmp_path / "siglip")), "float32")
    tensors = upstream_tensors(cfg, "float32")
    mutate(tmp_path / "src", config, tensors)
    write_checkpoint(tmp_path / "src", config, tensors)
    with pytest.raises(exc, match=pattern):
        from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    assert not (tmp_path / "ours").exists()


def test_truncated_shard_is_named(tmp_path, capsys):
    make_upstream_checkpoint(tmp_path / "src")
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model-00002-of-00002\.safetensors: truncated"):
        from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--check"]) == 2
    assert "model-00002-of-00002.safetensors: truncated" in capsys.readouterr().err


def test_unresolvable_vision_tower_asks_for_vision_config(tmp_path):
    config, _ = make_upstream_checkpoint(tmp_path / "src")
    config["mm_vision_tower"] = "someone/unknown-siglip"
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="--vision-config"):
        from_torch.open_source(tmp_path / "src")
    source = from_torch.open_source(tmp_path / "src", vision_config=tmp_path / "src-siglip" / "config.json")
    assert source.cfg.vision.num_layers == 2 and not from_torch.plan_import(source).problems


# ------------------------------------------------------------------------------------- safetensors reader
def test_sliced_reads_match_numpy_and_count_bytes(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 5, 7)).astype(ml_dtypes.bfloat16)
    save_file({"a": a, "s": np.array(2.0, np.float32)}, tmp_path / "x.safetensors")
    with SafetensorsCheckpoint(tmp_path / "x.safetensors") as ck:
        for index in [(), (slice(1, 3),), (slice(None), slice(2, 4)), (slice(2, 5), slice(1, 4), slice(3, 6))]:
            got = ck.read_slice("a", index)
            assert got.dtype == a.dtype and got.tobytes() == a[index].tobytes(), index
        before = ck.bytes_read
        ck.read_slice("a", (slice(0, 2), slice(0, 1), slice(0, 3)))
        assert ck.bytes_read - before == 2 * 3 * 2  # only the runs of the slice
        assert ck.read("s").shape == ()


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    make_upstream_checkpoint(tmp_path / "src")
    (tmp_path / "src" / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(SafetensorsError, match=r"model-00001-of-00002\.safetensors"):
        SafetensorsCheckpoint(tmp_path / "src")


def test_model_config_overrides_as_in_train_and_eval(tmp_path, capsys):
    make_upstream_checkpoint(tmp_path / "src", dtype="bfloat16")
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "ours"), "--no-progress",
                 "--config.model.param_dtype=float32", "--config.model.attention=flash",
                 "--config.model.remat_policy=full"]) == 0
    model = llavaction_jax.load_pretrained(tmp_path / "ours")
    assert (model.cfg.param_dtype, model.execution.attention, model.execution.remat_policy) == ("float32", "flash",
                                                                                                "full")
    assert model.params["text"]["embed"].dtype == np.float32  # a param_dtype override casts like --dtype
    capsys.readouterr()
    # a field that changes parameter shapes is refused, and nothing is written
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "bad"), "--no-progress",
                 "--config.model.text.num_layers=1"]) == 2
    assert "change the shapes" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exit_info:  # to-torch takes no overrides: a usage error naming the flag
        main(["convert", "to-torch", str(tmp_path / "ours"), "--out", str(tmp_path / "t"),
              "--config.model.attention=xla"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --config.model.attention" in capsys.readouterr().err


def as_hub_snapshot(src: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """`src` laid out as the Hugging Face hub cache does: blobs named by their digest (sha256 for safetensors, the
    git blob sha1 for small files), a snapshot of links to them."""
    import hashlib

    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for file in sorted(src.iterdir()):
        data = file.read_bytes()
        digest = (hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors"
                  else hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest())
        (cache / "blobs" / digest).write_bytes(data)
        (snapshot / file.name).symlink_to(pathlib.Path("..", "..", "blobs", digest))
    return snapshot


def flip_byte(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_checksums_are_verified_wherever_they_exist_and_never_written_over_unverified_data(tmp_path, capsys):
    from llavaction_jax import integrity

    convert = lambda *a: main(["convert", *map(str, a), "--no-progress"])
    make_upstream_checkpoint(tmp_path / "src")
    # a plain folder records no digests: converted with one warning, and the conversion carries no manifest
    assert convert("from-torch", tmp_path / "src", "--out", tmp_path / "plain") == 0
    assert "has no checksums.json, so its files cannot be verified" in capsys.readouterr().err
    assert not integrity.has_manifest(tmp_path / "plain")
    assert convert("to-torch", tmp_path / "plain", "--out", tmp_path / "plain-torch") == 0
    assert (f"warning: {tmp_path / 'plain'} has no checksums.json, so its files cannot be verified (so its export gets "
            "no checksums.json either)") in capsys.readouterr().err
    assert not integrity.has_manifest(tmp_path / "plain-torch")  # no manifest vouching for unverified weights
    llavaction_jax.load_pretrained(tmp_path / "plain")
    assert "warning" not in capsys.readouterr().err  # once per directory and process

    # a hub download is verified against the hub's own digests, and its conversion gets a manifest
    snapshot = as_hub_snapshot(tmp_path / "src", tmp_path / "hub")
    assert convert("from-torch", snapshot, "--out", tmp_path / "ours") == 0
    assert "warning" not in capsys.readouterr().err and integrity.verify_manifest(tmp_path / "ours")
    blob = (snapshot / "model-00001-of-00002.safetensors").resolve()
    flip_byte(blob)
    assert convert("from-torch", snapshot, "--out", tmp_path / "bad") == 2
    assert f"{snapshot / 'model-00001-of-00002.safetensors'} is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    # our export carries checksums.json: the import verifies it before reading anything
    assert convert("to-torch", tmp_path / "ours", "--out", tmp_path / "torch") == 0
    assert integrity.verify_manifest(tmp_path / "torch")
    assert convert("from-torch", tmp_path / "torch", "--out", tmp_path / "back") == 0
    assert integrity.verify_manifest(tmp_path / "back")
    exported = sorted((tmp_path / "torch").glob("*.safetensors"))[0]
    flip_byte(exported)
    capsys.readouterr()
    assert convert("from-torch", tmp_path / "torch", "--out", tmp_path / "back2") == 2
    assert f"{exported} is corrupt" in capsys.readouterr().err and not (tmp_path / "back2").exists()

    # flip one byte of a stored array: export and load both name the corrupt file instead of using it
    stored = max((p for p in (tmp_path / "ours" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip_byte(stored)
    assert convert("to-torch", tmp_path / "ours", "--out", tmp_path / "torch2") == 2
    assert stored.name in capsys.readouterr().err and not (tmp_path / "torch2").exists()
    with pytest.raises(integrity.IntegrityError, match=stored.name):
        llavaction_jax.load_pretrained(tmp_path / "ours")


def test_a_folder_of_pickled_weights_is_refused_without_reading_them(tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")  # a pickle protocol header
    with pytest.raises(ValueError, match=r"holds PyTorch pickle files \(pytorch_model.bin\) but no safetensors: "
                                         r"pickles are not read"):
        llavaction_jax.load_pretrained(folder)
    assert main(["convert", "from-torch", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "pickles are not read" in capsys.readouterr().err
