"""The files beside the weights that make a model directory usable on its own, here and in PyTorch.

Every model directory we write carries, next to ``llavaction_config.json`` and ``params/``:

* the tokenizer files (those of the tokenizer directory it was trained with, else Qwen2's as ``save_pretrained``
  writes them; tokenizer_config.json made loadable by transformers 4 and 5): `eval`, `predict` and `train` use
  the model's own tokenizer by default, and upstream's loader (llavaction/model/builder.py:
  load_pretrained_model) calls ``AutoTokenizer.from_pretrained(model_path)`` on the `convert to-torch` export,
  which copies them;
* ``generation_config.json``: greedy decoding that stops at ``<|im_end|>`` or ``<|endoftext|>`` of that tokenizer
  (upstream's ``generate`` settings), unless the source model brought its own;
* ``config.json``: the source's upstream or HF config when there was one (keys we do not model travel back on
  export), else the upstream config of the model (convert/upstream_config.export_config); with ``frames_upbound`` set
  to the frames per clip the model was trained on, as upstream's training saves its model arguments
  (`predict` samples that many frames by default).
"""

from __future__ import annotations

import json
import pathlib

from llavaction_jax.config import ModelConfig
from llavaction_jax.convert.upstream_config import export_config
from llavaction_jax.data.tokenizer import load_qwen_tokenizer, portable_tokenizer_files, tokenizer_files

GENERATION_CONFIG = "generation_config.json"
TORCH_CONFIG = "config.json"


def generation_config(tokenizer) -> dict:
    """Greedy decoding, stopping at the tokenizer's ``<|im_end|>`` or ``<|endoftext|>``, padding with the latter."""
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext,
            "do_sample": False}


def companion_files(cfg: ModelConfig, tokenizer_dir: str | pathlib.Path | None = None,
                    source_dir: str | pathlib.Path | None = None, num_frames: int | None = None) -> dict[str, str]:
    """name -> text of the files a model directory carries besides its weights.

    ``tokenizer_dir``: the tokenizer the model is used with (None: Qwen2's, data/tokenizer.qwen2_tokenizer);
    ``source_dir``: the directory the weights came from (train's init_from), whose generation_config.json and
    config.json are kept when it has them; ``num_frames``: frames per clip in training (config.json's
    ``frames_upbound``)."""
    tokenizer = load_qwen_tokenizer(tokenizer_dir)
    files = tokenizer_files(tokenizer) if tokenizer_dir is None else portable_tokenizer_files(tokenizer_dir)
    source = pathlib.Path(source_dir) if source_dir else None
    for name, default in ((GENERATION_CONFIG, lambda: generation_config(tokenizer)),
                          (TORCH_CONFIG, lambda: export_config(cfg))):
        kept = source / name if source is not None else None
        files[name] = kept.read_text(encoding="utf-8") if kept is not None and kept.is_file() else (
            json.dumps(default(), indent=2) + "\n")
    config = json.loads(files[TORCH_CONFIG])
    # Upstream's loader adds an <im_patch> token (and grows the vocabulary by one) unless the config says no, as
    # every released LLaVA-Video / LLaVAction config does (llavaction/model/builder.py: load_pretrained_model).
    config.setdefault("mm_use_im_patch_token", False)
    config.setdefault("mm_use_im_start_end", False)
    if num_frames:
        config["frames_upbound"] = int(num_frames)
    files[TORCH_CONFIG] = json.dumps(config, indent=2) + "\n"
    return files


def trained_num_frames(model_dir: str | pathlib.Path) -> int | None:
    """The frames per clip a model directory says it was trained on (config.json's ``frames_upbound``), or None."""
    file = pathlib.Path(model_dir) / TORCH_CONFIG
    if not file.is_file():
        return None
    value = json.loads(file.read_text(encoding="utf-8")).get("frames_upbound")
    return int(value) if value else None
