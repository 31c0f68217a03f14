"""The fingerprint of an evaluation's answers: what they depend on, by content, so an interrupted run's partial
answers are reused only by a rerun that would give the same ones.

By content, not by name: the model (its `checksums.json` manifest, which loading verified the files against, else
the sha256 of every file of the directory; a random preset by its name and seed), the question file and its meta,
the frame shards' manifest (it lists every shard's size and clips), the tokenizer's full definition, and every
setting that changes an answer: the whole model config, the execution choices (compute dtype, attention
kernel, ...), the batch layout, the
generation config and the evaluation settings but those that only change speed or reporting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from llavaction_jax import integrity
from llavaction_jax.data.frames import MANIFEST_NAME

# EvalSettings fields that change how fast a run goes or what it reports, never an answer
NOT_ANSWER_SETTINGS = ("threads", "progress_every_s", "strict")


def _file_sha256(path: pathlib.Path) -> str | None:
    return integrity.file_sha256(path) if path.is_file() else None


def model_content(model_dir: str | None, model_name: str) -> str:
    """The model's content digest (a directory), else its name (a random preset names its seed)."""
    if model_dir:
        return integrity.content_digest(model_dir)
    return model_name


def tokenizer_content(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(questions_path, questions_meta: dict | None, shards_dir, model_dir: str | None, model_name: str, cfg,
                execution, tokenizer, settings, layout, gen) -> str:
    what = {
        "questions": integrity.file_sha256(pathlib.Path(questions_path)), "questions_meta": questions_meta,
        "shards": _file_sha256(pathlib.Path(shards_dir) / MANIFEST_NAME),
        "model": model_content(model_dir, model_name), "model_config": cfg.to_dict(),
        "execution": dataclasses.asdict(execution),
        "tokenizer": tokenizer_content(tokenizer), "tokenizer_len": len(tokenizer),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_ANSWER_SETTINGS},
        "layout": dataclasses.asdict(layout), "generation": dataclasses.asdict(gen),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
