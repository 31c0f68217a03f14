"""EgoSchema (egoschema/EgoSchema): 5-way questions about 3-minute Ego4D clips.

Official files: ``questions.json``, a list of {"q_uid", "google_drive_id", "question", "option 0" ... "option 4"}
for all 5031 questions; ``subset_answers.json``, {q_uid: right option index} for the public 500-question subset;
videos ``{q_uid}.mp4``. Two lmms-eval tasks (``lmms_eval/tasks/egoschema/``): ``egoschema_subset`` (scored here)
and ``egoschema`` (all questions; the answers are withheld, so the run writes ``egoschema_submission.json``,
{q_uid: index}, for the official server). Prompt (``utils.py: egoschema_doc_to_text``): the question, the
lettered options one per line, "Answer with the option's letter from the given choices directly."
"""

from __future__ import annotations

import argparse

from llavaction_jax.eval.benchmarks import common

INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
SUBSET = common.Variant("egoschema_subset", "egoschema", "mmmu_first", 16)
FULL = common.Variant("egoschema", "egoschema", "mmmu_first", 16, has_answers=False)
VARIANTS = (SUBSET, FULL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", required=True, help="questions.json (all 5031 questions)")
    parser.add_argument("--answers", required=True, help="subset_answers.json ({q_uid: index}, the public 500)")


def prompt(text: str, lettered: list[str]) -> str:
    return text + "".join("\n" + o for o in lettered) + INSTRUCTION


def read_questions(path) -> list[dict]:
    rows = common.read_rows(path)
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: question {i}"
        uid = common.field(row, "q_uid", where)
        options = [str(common.field(row, f"option {k}", where)).strip() for k in range(5)]
        out.append({"q_uid": uid, "question": common.field(row, "question", where), "options": options})
    return out


def build(args) -> list[common.Built]:
    rows = read_questions(args.questions)
    answers = common.read_json(args.answers)
    if not isinstance(answers, dict):
        raise ValueError(f"{args.answers}: expected {{q_uid: answer index}}, got {type(answers).__name__}")
    known = {r["q_uid"] for r in rows}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise ValueError(f"{args.answers}: {len(unknown)} answers for questions not in {args.questions} "
                         f"(first: {unknown[:3]})")
    built = []
    for variant in VARIANTS:
        questions, clips = [], {}
        for row in rows:
            if variant.has_answers and row["q_uid"] not in answers:
                continue
            letter = None
            if variant.has_answers:
                index = int(answers[row["q_uid"]])
                if not 0 <= index < 5:
                    raise ValueError(f"{args.answers}: answer {index} of {row['q_uid']} is not an option index 0-4")
                letter = "ABCDE"[index]
            lettered = [f"{'ABCDE'[k]}. {o}" for k, o in enumerate(row["options"])]
            video = f"{row['q_uid']}.mp4"
            clips[video] = {"video": video}
            questions.append(common.question(row["q_uid"], video, row["question"], row["options"], letter,
                                             prompt(row["question"], lettered), submission_key=row["q_uid"]))
        built.append(common.Built(variant, questions, clips,
                                  {"questions": str(args.questions), "answers": str(args.answers)}))
    return built
