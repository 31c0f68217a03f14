"""What every benchmark builder shares: the question record it writes, the clip list for ``extract-frames``, the
output folder, and readers for the annotation formats the benchmarks ship in (JSON, JSONL, CSV, Parquet).

A builder turns a benchmark's official annotation files into one folder per lmms-eval task variant:

    OUT/<variant>/questions.jsonl            our ``videoqa`` question file, one question a line (fields below)
    OUT/<variant>/questions.jsonl.meta.json  {"format": "llavaction_jax.benchmark", "benchmark", "variant",
                                              "settings", "inputs"}: eval reads it to score the official way
    OUT/<variant>/clips.jsonl                {"uid", "video", "start"?, "end"?} per distinct clip, for
                                              ``extract-frames --jsonl clips.jsonl --video-root VIDEOS``

A question line: ``question_id``, ``clip_uid`` (the frame-shard uid of its video), ``question`` (as distributed),
``options`` (texts, unlettered), ``answer`` (the right letter; null where the benchmark withholds it), ``prompt``
(the user text lmms-eval's ``doc_to_text`` gives, which follows the ``<image>`` line verbatim), ``groups`` (the
official breakdown keys, e.g. {"duration": "short"}), ``time_instruction`` (none / lmms-eval / llava-video) and
``submission_key`` (EgoSchema: the id its server expects).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

from llavaction_jax.ek100.mqa import meta_path
from llavaction_jax.eval.questions import TIME_STYLES

FORMAT_NAME = "llavaction_jax.benchmark"
QUESTIONS_NAME = "questions.jsonl"
CLIPS_NAME = "clips.jsonl"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One lmms-eval task: how its answers are parsed and aggregated, and its official breakdowns."""

    name: str  # lmms-eval task name, also the output folder
    benchmark: str
    parser: str  # key of parsers.PARSERS
    max_new_tokens: int  # lmms-eval's generation_kwargs for the task (llava_vid's 1024 where the task sets none)
    groups: tuple[str, ...] = ()  # breakdown keys, in report order
    aggregate: str = "micro"  # micro: correct / all; mvbench: per task over non-empty answers, then their mean
    has_answers: bool = True  # False: predictions only (EgoSchema full set, scored by its server)


@dataclasses.dataclass
class Built:
    variant: Variant
    questions: list[dict]
    clips: dict[str, dict]  # clip uid -> {"video": path relative to the video root, "start"?, "end"?}
    inputs: dict  # annotation paths that went in


def question(question_id, clip_uid, text, options, answer, prompt, groups=None, **extra) -> dict:
    return {"question_id": str(question_id), "clip_uid": str(clip_uid), "question": text,
            "options": [str(o) for o in options], "answer": answer, "prompt": prompt, "groups": groups or {}, **extra}


def write_variant(out_root: pathlib.Path, built: Built, settings: dict, overwrite: bool = False) -> pathlib.Path:
    """Write one variant's folder; refuses a non-empty folder unless ``overwrite``."""
    folder = pathlib.Path(out_root) / built.variant.name
    ours = [folder / QUESTIONS_NAME, meta_path(folder / QUESTIONS_NAME), folder / CLIPS_NAME]
    if any(p.exists() for p in ours) and not overwrite:
        raise ValueError(f"{folder} already holds a built benchmark; choose another --out or pass --overwrite")
    if not built.questions:
        raise ValueError(f"{built.variant.name}: no questions read from {built.inputs}")
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for q in built.questions:
        if q["question_id"] in seen:
            raise ValueError(f"{built.variant.name}: question id {q['question_id']!r} appears twice in {built.inputs}")
        seen.add(q["question_id"])
        q["time_instruction"] = settings["time_instruction"]
    _write_lines(folder / QUESTIONS_NAME, built.questions)
    _write_lines(folder / CLIPS_NAME, [{"uid": uid, **clip} for uid, clip in sorted(built.clips.items())])
    meta = {"format": FORMAT_NAME, "benchmark": built.variant.benchmark, "variant": built.variant.name,
            "variant_spec": dataclasses.asdict(built.variant), "settings": settings, "inputs": built.inputs,
            "num_questions": len(built.questions), "num_clips": len(built.clips)}
    meta_path(folder / QUESTIONS_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def _write_lines(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_json(path) -> object:
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def read_rows(path) -> list[dict]:
    """Rows of a table in any of the forms benchmarks ship: a JSON list, JSONL, CSV, or Parquet (needs pyarrow,
    which is optional)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only for the Hugging Face parquet exports
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or pass the same rows "
                             "as JSON / JSONL") from None
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
        return rows
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def field(row: dict, key: str, where: str):
    """``row[key]``, or an error naming the file / record and the missing key."""
    if key not in row:
        raise ValueError(f"{where}: no {key!r} field (has: {', '.join(sorted(row))})")
    return row[key]


def strip_letter(option: str, letter: str) -> str:
    """"A. text" -> "text" (the lettered options VideoMME / EgoSchema exports carry); anything else unchanged."""
    option = str(option).strip()
    for prefix in (f"{letter}. ", f"{letter}.", f"({letter}) "):
        if option.startswith(prefix):
            return option[len(prefix):].strip()
    return option
