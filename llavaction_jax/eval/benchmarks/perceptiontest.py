"""PerceptionTest multiple-choice video QA, validation split (google-deepmind/perception_test).

Official file: ``mc_question_valid.json`` (or ``all_valid.json``): {video_id: {"metadata": {"video_id", ...},
"mc_question": [{"id", "question", "options": [3 texts], "answer_id", "area", "reasoning", "tag"}, ...], ...}};
videos ``{video_id}.mp4``. lmms-eval task ``perceptiontest_val_mc`` (``lmms_eval/tasks/perceptiontest/val/``):
prompt = question, "A. / B. / C." options one per line, "Answer with the option's letter from the given choices
directly."; the answer is the first standalone A-D of the generation; metric: accuracy. We add the official
per-area and per-reasoning breakdowns.
"""

from __future__ import annotations

import argparse

from llavaction_jax.eval.benchmarks import common

INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
VAL_MC = common.Variant("perceptiontest_val_mc", "perceptiontest", "first_word_letter", 1024,
                        groups=("area", "reasoning"))
VARIANTS = (VAL_MC,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="mc_question_valid.json (or all_valid.json)")


def prompt(text: str, options: list[str]) -> str:
    return text + "".join(f"\n{'ABC'[k]}. {o}" for k, o in enumerate(options[:3])) + INSTRUCTION


def build(args) -> list[common.Built]:
    data = common.read_json(args.annotations)
    if not isinstance(data, dict):
        raise ValueError(f"{args.annotations}: expected {{video_id: {{metadata, mc_question}}}}")
    questions, clips = [], {}
    for video_id, entry in data.items():
        for i, q in enumerate(entry.get("mc_question", [])):
            where = f"{args.annotations}: {video_id} mc_question {i}"
            options = [str(o) for o in common.field(q, "options", where)]
            answer = int(common.field(q, "answer_id", where))
            if not 0 <= answer < len(options):
                raise ValueError(f"{where}: answer_id {answer} is not an index of its {len(options)} options")
            video = f"{video_id}.mp4"
            clips[video] = {"video": video}
            questions.append(common.question(
                f"{video_id}-{common.field(q, 'id', where)}", video, common.field(q, "question", where), options,
                "ABCDE"[answer], prompt(q["question"], options),
                groups={"area": q.get("area", ""), "reasoning": q.get("reasoning", "")}))
    return [common.Built(VAL_MC, questions, clips, {"annotations": str(args.annotations)})]
