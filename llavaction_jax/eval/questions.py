"""Question files the ``eval`` command reads, normalised to one record type.

Two formats:

* ``ek100``: the JSONL written by ``build-mqa`` (ek100/mqa.py). The user message is stored in the file byte for byte
  (``"<image>\\n"`` + ``prompt``); the clip is the frame-shard record whose uid is the question uid (narration_id).
* ``videoqa``: generic multiple-choice video QA (MVBench / NExT-QA style), one JSON object a line:
  ``question``; ``options`` (or ``candidates``): a list, lettered ("A. cup") or not ("cup"); ``answer``: a letter,
  a 0-based index, or an option's text (also read from ``gt_letter`` / ``answer_idx``); the question id from
  ``question_id`` / ``id`` / ``uid`` (else the line number); the clip from ``clip_uid`` / ``uid`` / ``video`` /
  ``"{video}_{start:.2f}_{end:.2f}"`` (the first that is a frame-shard uid; these are the names ``extract-frames
  --jsonl`` gives); optional ``category`` / ``task_type`` / ``type`` for a per-category breakdown.
  The prompt is the question, the lettered options one per line and a closing instruction, behind LLaVA-Video's
  time instruction (data/chat.llava_video_time_prompt; upstream llavaction/train/train.py:
  LazySupervisedDataset._get_item) stating the clip's duration and the
  number of frames the model sees. Files written by ``build-bench`` (eval/benchmarks/) add ``prompt`` (the
  benchmark's own user text, used verbatim instead), ``groups`` (its official breakdown keys), ``time_instruction``
  (none / lmms-eval / llava-video: which instruction ``--time-instruction`` prepends), ``submission_key`` and a null
  ``answer`` where the benchmark withholds it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from llavaction_jax.data import chat
from llavaction_jax.ek100 import labels, prompts
from llavaction_jax.ek100.mqa import read_question_file

FORMATS = ("ek100", "videoqa")
TIME_STYLES = ("none", "lmms-eval", "llava-video")  # videoqa "time_instruction": none, lmms-eval's, LLaVA-Video's
EK100_KEYS = ("uid", "options", "gt_text", "prompt")
# lmms-eval's instruction for lettered multiple choice (MVBench / NExT-QA tasks).
DEFAULT_VIDEOQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_LETTERED = re.compile(r"^\(?([A-Z])[.)]\s*(.*)$", re.S)


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    uid: str
    clip_uids: tuple[str, ...]  # frame-shard uids to try, in order
    options: tuple[str, ...]  # lettered: "A. open door"
    gt_letter: str | None  # None: no option is right (a build-mqa question without the GT)
    gt_text: str
    fixed_user_message: str | None = None  # ek100: the stored message; videoqa: built per clip (duration, frames)
    question: str = ""
    groups: dict = dataclasses.field(default_factory=dict)  # breakdown key -> value, e.g. {"verb": 3, "noun": 8}
    extra: dict = dataclasses.field(default_factory=dict)  # copied into the prediction record
    prompt_text: str | None = None  # videoqa from build-bench: the benchmark's text after "<image>\n", verbatim
    time_style: str = "llava-video"  # videoqa: which time instruction --time-instruction adds (TIME_STYLES)

    def option_texts(self) -> list[str]:
        return [o.split(". ", 1)[-1] for o in self.options]

    def user_message(self, duration: float, num_frames: int, time_instruction: bool, instruction: str,
                     frame_times: tuple[float, ...] = ()) -> str:
        if self.fixed_user_message is not None:
            return self.fixed_user_message
        if self.prompt_text is not None:
            body = f"{prompts.IMAGE_TOKEN}\n{self.prompt_text}"
        else:
            body = f"{prompts.IMAGE_TOKEN}\n{self.question}\n" + "\n".join(self.options)
            body += f"\n{instruction}" if instruction else ""
        if not time_instruction or self.time_style == "none":
            return body
        if self.time_style == "lmms-eval":
            return lmms_eval_time_prompt(body, duration, num_frames, frame_times)
        return chat.llava_video_time_prompt(body, duration, num_frames)


def lmms_eval_time_prompt(body: str, duration: float, num_frames: int, frame_times: tuple[float, ...]) -> str:
    """lmms-eval llava_vid's time instruction (lmms_eval/models/simple/llava_vid.py: generate_until, with
    add_time_instruction): it lists the frames' times and lacks a space before "Please" (kept byte for byte)."""
    times = ",".join(f"{t:.2f}s" for t in frame_times)
    text = body[len(prompts.IMAGE_TOKEN) + 1:] if body.startswith(prompts.IMAGE_TOKEN + "\n") else body
    return (f"{prompts.IMAGE_TOKEN}\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are "
            f"uniformly sampled from it. These frames are located at {times}.Please answer the following questions "
            f"related to this video.\n{text}")


def detect_format(meta: dict | None, records: list[dict]) -> str:
    if meta is not None and meta.get("format") == "llavaction_jax.ek100_mqa":
        return "ek100"
    if records and all(key in records[0] for key in EK100_KEYS):
        return "ek100"
    return "videoqa"


def load_questions(path: str | pathlib.Path, fmt: str = "auto",
                   label_space: str = "ek100") -> tuple[str, dict | None, list[EvalQuestion]]:
    """(format, meta or None, questions) of a question file; errors name the file and line. A build-mqa file
    whose action ids come from the UDA stand-ins is refused unless `label_space` is "uda" (see labels.LABEL_SPACES)."""
    try:
        meta, records = read_question_file(path)
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path)) from None
    if not records:
        raise ValueError(f"{path}: no questions")
    fmt = detect_format(meta, records) if fmt == "auto" else fmt
    if fmt == "ek100" and label_space != "uda" and question_label_space(meta) == "uda":
        raise ValueError(f"{path} was built with the UDA label space (2684 actions, not the 3806 of "
                         "EPIC_100_train.csv that the released head predicts); pass --label-space uda to evaluate it")
    if fmt not in FORMATS:
        raise ValueError(f"question format must be one of {FORMATS} or auto, got {fmt!r}")
    convert = ek100_question if fmt == "ek100" else videoqa_question
    questions = []
    for line, record in enumerate(records, start=1):
        try:
            questions.append(convert(record, line))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{line}: not a {fmt} question ({type(e).__name__}: {e})") from None
    seen: dict[str, int] = {}
    for line, q in enumerate(questions, start=1):
        if q.uid in seen:
            raise ValueError(f"{path}:{line}: question uid {q.uid!r} already used on line {seen[q.uid]}")
        seen[q.uid] = line
    return fmt, meta, questions


def not_utf8(path: str | pathlib.Path) -> str:
    """The error for a question file that is not UTF-8 text, naming the first line that does not decode."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}:{number}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                        "question files are UTF-8 JSON lines")
    return f"{path}: not UTF-8 text; question files are UTF-8 JSON lines"


def question_label_space(meta: dict | None) -> str | None:
    """The label space a build-mqa file's action ids index: recorded by name, or (older files) read off the
    train CSVs it names; None when the meta does not tell."""
    if not meta:
        return None
    name = meta.get("label_space", {}).get("name")
    if name:
        return name
    train_csvs = [pathlib.Path(p).name for p in meta.get("inputs", {}).get("train_csvs", [])]
    return "uda" if any("uda" in n.lower() for n in train_csvs) else "ek100" if train_csvs else None


def ek100_question(record: dict, line: int) -> EvalQuestion:
    options = tuple(record["options"])
    if "gt_letter" not in record:  # scored as wrong otherwise; build-mqa writes null when the options miss the GT
        raise ValueError("no 'gt_letter' key (null marks a question whose options miss the ground truth)")
    gt_letter = record["gt_letter"]
    if gt_letter is not None and gt_letter not in [o.split(". ", 1)[0] for o in options]:
        raise ValueError(f"gt_letter {gt_letter!r} is not one of the option letters")
    extra = {k: record[k] for k in ("gt_vn", "option_vns", "top1_text", "top1_vn", "source", "narration", "test_type")
             if k in record}
    groups = {k: record[f"{k}_id"] for k in ("verb", "noun") if record.get(f"{k}_id") is not None}
    # "user_message": the whole message, for a prompt whose video is not first (caption_then_answer's second pass)
    message = record.get("user_message") or f"{prompts.IMAGE_TOKEN}\n{record['prompt']}"
    return EvalQuestion(uid=str(record["uid"]), clip_uids=(str(record["uid"]),), options=options,
                        gt_letter=gt_letter, gt_text=record["gt_text"], fixed_user_message=message, groups=groups,
                        extra=extra)


def _first(record: dict, *keys):
    return next((record[k] for k in keys if record.get(k) is not None), None)


def videoqa_question(record: dict, line: int) -> EvalQuestion:
    texts = option_texts(_first(record, "options", "candidates"))
    options = tuple(prompts.letter_options(texts))
    answer = _first(record, "answer", "gt_letter", "answer_idx")
    withheld = answer is None and "answer" in record  # null: the benchmark keeps its answers (EgoSchema full set)
    index = None if withheld else _answer_index(answer, texts)
    uid = _first(record, "question_id", "id", "uid")
    video = record.get("video")
    clip_uids = [record.get("clip_uid"), record.get("uid"), video]
    if video is not None and record.get("start") is not None and record.get("end") is not None:
        clip_uids.append(f"{video}_{float(record['start']):.2f}_{float(record['end']):.2f}")
    clip_uids = tuple(dict.fromkeys(str(c) for c in clip_uids if c is not None))
    if not clip_uids:
        raise ValueError("no clip: give 'video' (or 'clip_uid')")
    category = _first(record, "category", "task_type", "type")
    groups = {} if category is None else {"category": category}
    groups.update(record.get("groups") or {})
    style = record.get("time_instruction", "llava-video")
    if style not in TIME_STYLES:
        raise ValueError(f"time_instruction {style!r} is not one of {TIME_STYLES}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    return EvalQuestion(uid=str(uid if uid is not None else f"line{line}"), clip_uids=clip_uids, options=options,
                        gt_letter=None if index is None else prompts.LETTERS[index],
                        gt_text="" if index is None else texts[index], question=str(record["question"]),
                        groups=groups, extra={k: record[k] for k in ("submission_key",) if k in record},
                        prompt_text=prompt, time_style=style)


def option_texts(options) -> list[str]:
    """Answer texts of an option list: as given, or with the letters of a fully lettered list removed."""
    if not isinstance(options, list) or len(options) < 2:
        raise ValueError(f"'options' must be a list of at least 2 answers, got {options!r}")
    options = [str(o) for o in options]
    lettered = [_LETTERED.match(o) for o in options]
    if all(lettered) and [m.group(1) for m in lettered] == list(prompts.LETTERS[: len(options)]):
        return [m.group(2).strip() for m in lettered]  # "A. cup" / "(A) cup" -> "cup"; relettered as "A. cup"
    return options


def _answer_index(answer, texts: list[str]) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(texts):
        return answer
    if isinstance(answer, str):
        stripped = answer.strip()
        letter = _LETTERED.match(stripped)
        if len(stripped) == 1 and stripped in prompts.LETTERS[: len(texts)]:
            return prompts.LETTERS.index(stripped)
        if stripped in texts:
            return texts.index(stripped)
        if letter and letter.group(1) in prompts.LETTERS[: len(texts)] and letter.group(2).strip() == texts[
                prompts.LETTERS.index(letter.group(1))]:
            return prompts.LETTERS.index(letter.group(1))
    raise ValueError(f"answer {answer!r} is not a letter, an index or the text of one of the {len(texts)} options")


def class_names(meta: dict | None, annotations: str | None) -> dict[str, dict]:
    """EK100 verb / noun names by class id, from ``annotations`` or the directory of the question file's
    validation CSV (recorded in its meta); {} when the class CSVs are not there."""

    folder = pathlib.Path(annotations) if annotations else None
    if folder is None and meta and meta.get("inputs", {}).get("validation_csv"):
        folder = pathlib.Path(meta["inputs"]["validation_csv"]).parent
    if folder is None or not (folder / labels.VERB_CLASSES_CSV).is_file():
        return {}
    return {"verb": labels.read_class_keys(folder / labels.VERB_CLASSES_CSV, False),
            "noun": labels.read_class_keys(folder / labels.NOUN_CLASSES_CSV, True)}
