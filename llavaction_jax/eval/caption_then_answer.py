"""Upstream's ``caption_then_answer`` test (llavaction/action/llava_inference.py, upstream @bd9f465): the model
first describes the clip, then answers the multiple-choice question with its description in front:

1. caption pass: ``"<image>\\n"`` + the first-person caption prompt, no time instruction (upstream calls
   ``llava_inference`` again with ``test_type='caption'`` and its defaults), greedy;
2. answer pass: ``"You observed the video before and wrote down the notes: {caption}. Now you watch the same video
   again and you can do better. <image>\\n"`` + the question's MC prompt (time instruction and perspective as the
   question file says), answered and scored like any question.

Both passes are ordinary ``eval`` runs on the same clips: OUT/caption_pass/ holds the captions (predictions.jsonl,
the raw decoded text is the caption), OUT/ the answers, metrics and report of the second pass, whose question
file (OUT/caption_pass/answer_questions.jsonl) records each caption. Both passes resume like ``eval``. The caption
is cut at the run's ``max_new_tokens`` (upstream: 4096).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from llavaction_jax.ek100 import prompts
from llavaction_jax.ek100.mqa import read_question_file, write_question_file
from llavaction_jax.eval.runner import EvalSettings, evaluate

PASS_DIR = "caption_pass"
ANSWER_QUESTIONS = "answer_questions.jsonl"


def caption_questions(records: list[dict], path: str) -> list[dict]:
    """The first pass's records: the caption prompt as the whole user message."""
    missing = [r.get("uid") for r in records if "caption_prompt" not in r]
    if missing:
        raise ValueError(f"{path}: questions without 'caption_prompt' (first: {missing[:3]}); build the file with "
                         "build-mqa --test-type caption_then_answer")
    return [{**r, "user_message": f"{prompts.IMAGE_TOKEN}\n{r['caption_prompt']}"} for r in records]


def answer_questions(records: list[dict], captions: dict[str, str]) -> list[dict]:
    """The second pass's records: each question's MC prompt behind its caption."""
    return [{**r, "caption": captions[str(r["uid"])],
             "user_message": prompts.caption_then_answer_message(captions[str(r["uid"])], r["prompt"])}
            for r in records]


def _from_process_0(value: dict | None) -> dict:
    """Process 0's ``value`` on every process (no shared filesystem assumed)."""
    if jax.process_count() == 1:
        return value
    payload = np.frombuffer(json.dumps(value).encode() if value is not None else b"", np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array([payload.size], np.int64))[0])
    padded = np.zeros(size, np.uint8)
    padded[: min(size, payload.size)] = payload[:size]
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes())


def evaluate_caption_then_answer(params, cfg, tokenizer, questions_path, shards_dir, out_dir, settings: EvalSettings,
                                 mesh, *, log=print, **kwargs) -> dict | None:
    """Both passes; returns the answer pass's results on process 0 (None elsewhere), like ``runner.evaluate``."""
    meta, records = read_question_file(questions_path)
    records = records[: settings.limit] if settings.limit else records
    out_dir = pathlib.Path(out_dir)
    pass_dir = out_dir / PASS_DIR
    caption_meta = None if meta is None else {**meta, "settings": {**meta.get("settings", {}), "test_type": "caption"}}
    write_question_file(pass_dir / "caption_questions.jsonl", caption_questions(records, str(questions_path)),
                        caption_meta)
    if jax.process_index() == 0:
        log(f"[eval] caption_then_answer: caption pass over {len(records)} clips -> {pass_dir}")
    evaluate(params, cfg, tokenizer, pass_dir / "caption_questions.jsonl", shards_dir, pass_dir,
             dataclasses.replace(settings, modes=("generate",), limit=None), mesh, log=log, **kwargs)
    captions = None
    if jax.process_index() == 0:
        with open(pass_dir / "predictions.jsonl", encoding="utf-8") as f:
            captions = {r["uid"]: r["generate"]["raw"] for r in map(json.loads, f)}
    captions = _from_process_0(captions)
    write_question_file(pass_dir / ANSWER_QUESTIONS, answer_questions(records, captions), meta)
    if jax.process_index() == 0:
        log(f"[eval] caption_then_answer: answer pass -> {out_dir}")
    return evaluate(params, cfg, tokenizer, pass_dir / ANSWER_QUESTIONS, shards_dir, out_dir,
                    dataclasses.replace(settings, limit=None), mesh, log=log, **kwargs)
