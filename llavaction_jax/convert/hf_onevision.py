"""The Hugging Face llava-onevision layout: key names and config.json, for exporting `one_token` models.

These are the names the transformers conversion script writes for the hub's llava-onevision models
(transformers `models/llava_onevision/convert_llava_onevision_weights_to_hf.py`), which transformers 4.x and 5.x
both load. Reading such checkpoints needs nothing from here: `keys.normalise_key` already maps every HF spelling
onto the upstream names.

The vision tower's part (its prefix, its `vision_config`, the tensors HF's module has and LLaVA never applies, its
image processor settings) comes from its registry entry (vision_towers.py).

`processor_files` writes what `transformers.AutoProcessor` / `LlavaOnevisionProcessor.from_pretrained` reads beside
the weights, with the values that script saves for the hub's llava-hf/llava-onevision-* repos: the tower's image and
video processor settings (SigLIP's: bicubic resize to the tower's image size, x/255, mean = std = 0.5) with the
anyres grid of the model config, the processor's token counts, and a tokenizer holding `<image>` / `<video>` as
special tokens whose ids are the config's image_token_index / video_token_index, with the onevision chat template.
"""

from __future__ import annotations

import json
import pathlib
import re

from PIL import Image
from tokenizers import AddedToken

from llavaction_jax.config import ModelConfig
from llavaction_jax.convert.keys import ConversionError, default_tower, tower_of
from llavaction_jax.data.tokenizer import load_qwen_tokenizer, tokenizer_files
from llavaction_jax.vision_towers import VisionTower

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
PROCESSOR_CLASS = "LlavaOnevisionProcessor"
DEFAULT_ASPECT_RATIO = "anyres_max_9"  # upstream's onevision configs and transformers' default
# The template of the hub's llava-hf onevision repos: images, then videos, then the text of each message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_key(upstream_key: str, tower: VisionTower | None = None) -> str:
    """Upstream LLaVA-NeXT key -> HF llava-onevision key (`tower`: the model's vision tower, default the default)."""
    tower = tower or default_tower()
    if upstream_key.startswith(tower.upstream_prefix):
        return tower.hf_prefix + upstream_key[len(tower.upstream_prefix):]
    if upstream_key.startswith("model.mm_projector."):
        index, rest = upstream_key[len("model.mm_projector."):].split(".", 1)
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{rest}"
    if upstream_key == "model.image_newline":
        return "image_newline"
    if upstream_key.startswith("model."):
        return "language_model." + upstream_key
    if upstream_key == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(f"{upstream_key!r} has no place in the HF llava-onevision layout")


def identity_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """HF key -> (shape, fill) of the tower's tensors that HF modules have and LLaVA never applies
    (`VisionTower.hf_identity_tensors`; SigLIP's final LayerNorm, as LLaVA reads a hidden state before it).

    We do not keep them, so the export writes constants (SigLIP: an identity LayerNorm, weight 1 and bias 0) to
    make the HF model load without missing keys; their value cannot change any output of the LLaVA model.
    """
    tower, h = tower_of(cfg), cfg.vision.hidden_size
    return {tower.hf_prefix + key: ((h,), fill) for key, fill in tower.hf_identity_tensors}


# What `--layout hf-onevision` cannot represent: its --help and its refusal both say this.
LIMITS = ("transformers' LlavaOnevisionForConditionalGeneration has no action token and no verb / noun / action "
          "heads, and puts one newline after each video, pooled bilinearly through a 2-layer GELU projector; so "
          "LLaVAction's action token and heads (and grid / frame newlines, other pooling or projectors) cannot be "
          "written in it")


def check_exportable(cfg: ModelConfig) -> None:
    """The HF model can only express the one_token video layout with bilinear pooling and no action heads."""
    problems = []
    if cfg.newline_position != "one_token" or not cfg.has_image_newline:
        problems.append(f"mm_newline_position={cfg.newline_position!r} (HF appends ONE newline per video)")
    if cfg.pool_mode != "bilinear":
        problems.append(f"mm_spatial_pool_mode={cfg.pool_mode!r} (HF pools bilinearly)")
    if cfg.projector_type != "mlp2x_gelu":
        problems.append(f"mm_projector_type={cfg.projector_type!r} (HF has linear_1, GELU, linear_2)")
    if cfg.vision_supervision is not None:
        problems.append(f"vision_supervision={cfg.vision_supervision!r} (HF has no action token or heads)")
    if problems:
        raise ConversionError("this model cannot be written in the HF llava-onevision layout: " + "; ".join(problems)
                              + f". {LIMITS[0].upper()}{LIMITS[1:]}. Use --layout upstream.")


def hf_config(cfg: ModelConfig) -> dict:
    """An HF LlavaOnevisionConfig dict; top-level keys of an imported HF config (cfg.extra) are kept."""
    t, v, tower = cfg.text, cfg.vision, tower_of(cfg)
    out = dict(cfg.extra.get("hf_onevision", {}))
    out.update(
        architectures=["LlavaOnevisionForConditionalGeneration"],
        model_type="llava_onevision",
        tie_word_embeddings=t.tie_word_embeddings,
        vision_feature_layer=-1,  # the tower below already stops at the selected layer
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        use_image_newline_parameter=True,
        text_config=dict(
            model_type="qwen2", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings,
            hidden_act="silu",
        ),
        vision_config=dict(model_type=tower.hf_model_type,
                           **{key: getattr(v, field) for field, key, _ in tower.config_keys}, **tower.hf_config),
    )
    out.setdefault("image_token_index", 151646)  # transformers' LlavaOnevisionConfig defaults
    out.setdefault("video_token_index", 151647)
    out.setdefault("image_grid_pinpoints", grid_pinpoints(cfg))
    out.setdefault("vision_aspect_ratio", aspect_ratio(cfg))
    return out


def grid_pinpoints(cfg: ModelConfig) -> list[list[int]]:
    """The anyres resolutions of the model config (upstream's `image_grid_pinpoints`), as HF lists them.

    Upstream writes either a list of [height, width] pairs or a range "(1x1),...,(6x6)" of tile counts, which
    it multiplies by the tower's image size (llava/mm_utils.py: process_anyres_image); absent, the 1x1..6x6
    tiles of transformers' default."""
    raw = cfg.extra.get("image_grid_pinpoints", cfg.extra.get("hf_onevision", {}).get("image_grid_pinpoints"))
    if isinstance(raw, list):
        return [[int(h), int(w)] for h, w in raw]
    tiles = re.findall(r"\((\d+)x(\d+)\)", raw) if isinstance(raw, str) else []
    (h0, w0), (h1, w1) = ((int(a), int(b)) for a, b in (tiles[0], tiles[-1])) if tiles else ((1, 1), (6, 6))
    size = cfg.vision.image_size
    return [[size * i, size * j] for i in range(h0, h1 + 1) for j in range(w0, w1 + 1)]


def aspect_ratio(cfg: ModelConfig) -> str:
    """HF's `vision_aspect_ratio` (the most tiles an anyres image keeps), from upstream's `image_aspect_ratio`."""
    raw = cfg.extra.get("image_aspect_ratio", cfg.extra.get("hf_onevision", {}).get("vision_aspect_ratio"))
    return raw if isinstance(raw, str) and raw.startswith("anyres_max_") else DEFAULT_ASPECT_RATIO


def processor_configs(cfg: ModelConfig) -> dict[str, dict]:
    """name -> content of the image processor, video processor and processor configs for `cfg`'s tower."""
    size = {"height": cfg.vision.image_size, "width": cfg.vision.image_size}
    pre = tower_of(cfg).preprocessing
    pixels = dict(do_convert_rgb=True, do_resize=True, size=size,
                  resample=int(Image.Resampling[pre.resample.upper()]),  # HF stores PIL's filter number
                  do_rescale=True, rescale_factor=pre.rescale, do_normalize=True,
                  image_mean=list(pre.mean), image_std=list(pre.std))
    return {
        "preprocessor_config.json": dict(image_processor_type="LlavaOnevisionImageProcessor", **pixels,
                                         do_pad=True, image_grid_pinpoints=grid_pinpoints(cfg),
                                         processor_class=PROCESSOR_CLASS),
        # frames are given already sampled (the EK100 rule is not one of transformers' samplers)
        "video_preprocessor_config.json": dict(video_processor_type="LlavaOnevisionVideoProcessor", **pixels,
                                               do_sample_frames=False, processor_class=PROCESSOR_CLASS),
        "processor_config.json": dict(processor_class=PROCESSOR_CLASS,
                                      num_image_tokens=(cfg.vision.image_size // cfg.vision.patch_size) ** 2,
                                      vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                                      video_token=VIDEO_TOKEN, vision_aspect_ratio=aspect_ratio(cfg)),
    }


def processor_files(cfg: ModelConfig, tokenizer_dir: pathlib.Path | None) -> tuple[dict[str, str], dict]:
    """(name -> text of the processor files, config.json keys that must agree with them).

    With a tokenizer in `tokenizer_dir`: its files again, `<image>` and `<video>` added as special tokens where
    missing (after the last entry, as transformers' conversion script adds them) and the onevision chat template,
    plus the config's image_token_index / video_token_index set to their ids. Without one: the image and video
    processor configs only (`AutoProcessor` needs a tokenizer)."""
    files = {name: json.dumps(value, indent=2) + "\n" for name, value in processor_configs(cfg).items()}
    if tokenizer_dir is None:
        del files["processor_config.json"]
        return files, {}
    tokenizer = load_qwen_tokenizer(tokenizer_dir)
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    if max(ids) >= cfg.text.vocab_size:
        raise ConversionError(
            f"the tokenizer in {tokenizer_dir} puts {IMAGE_TOKEN} / {VIDEO_TOKEN} at ids {ids[0]} / {ids[1]}, beyond "
            f"the model's {cfg.text.vocab_size} embedding rows; HF llava-onevision needs them in its vocabulary")
    tokenizer.chat_template = CHAT_TEMPLATE
    files.update(tokenizer_files(tokenizer))
    return files, {"image_token_index": ids[0], "video_token_index": ids[1]}
