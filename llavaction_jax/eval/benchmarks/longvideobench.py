"""LongVideoBench (longvideobench/LongVideoBench), validation split, video-only variant.

Official file: ``lvb_val.json``, a list of {"id", "video_id", "video_path", "question", "candidates": [2-5 texts],
"correct_choice": index, "duration_group": 15 / 60 / 600 / 3600, "question_category", "duration", "subtitle_path",
...}; the Hugging Face rows carry the candidates as option0-option4 instead ("N/A" for missing ones); both are
read. Videos ``videos/{video_path}``. lmms-eval task ``longvideobench_val_v`` (``lmms_eval/tasks/longvideobench/``):
prompt = question, "A. c0" ... one per line, then "Answer with the option's letter from the given choices
directly.\\n"; the first A-E after removing "The best answer is" and similar phrases; reported per duration group
and question category.
"""

from __future__ import annotations

import argparse

from llavaction_jax.eval.benchmarks import common

INSTRUCTION = "Answer with the option's letter from the given choices directly.\n"
VAL_V = common.Variant("longvideobench_val_v", "longvideobench", "lvb_first_letter", 32,
                       groups=("duration_group", "question_category"))
VARIANTS = (VAL_V,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="lvb_val.json (or the HF rows as JSON / parquet)")


def candidates(row: dict, where: str) -> list[str]:
    if "candidates" in row:
        return [str(c) for c in row["candidates"]]
    options = []
    for k in range(5):
        value = row.get(f"option{k}")
        if value is None or value == "N/A":
            break
        options.append(str(value))
    if not options:
        raise ValueError(f"{where}: no 'candidates' list and no option0-option4 fields")
    return options


def prompt(text: str, options: list[str]) -> str:
    return text + "\n" + "\n".join(f"{'ABCDE'[k]}. {o}" for k, o in enumerate(options)) + "\n" + INSTRUCTION


def build(args) -> list[common.Built]:
    questions, clips = [], {}
    for i, row in enumerate(common.read_rows(args.annotations)):
        where = f"{args.annotations}: question {i}"
        options = candidates(row, where)
        answer = int(common.field(row, "correct_choice", where))
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: correct_choice {answer} is not an index of its {len(options)} candidates")
        video = str(common.field(row, "video_path", where))
        clips[video] = {"video": video}
        questions.append(common.question(
            common.field(row, "id", where), video, common.field(row, "question", where), options, "ABCDE"[answer],
            prompt(row["question"], options),
            groups={"duration_group": str(row.get("duration_group", "")),
                    "question_category": str(row.get("question_category", ""))}))
    return [common.Built(VAL_V, questions, clips, {"annotations": str(args.annotations)})]
