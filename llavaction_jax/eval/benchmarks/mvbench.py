"""MVBench (OpenGVLab/MVBench): 20 temporal tasks, 200 questions each.

Official files: ``json/{task}.json``, a list of {"video", "question", "candidates": [texts], "answer": the right
candidate's text, and for the segment tasks "start" / "end" seconds}; videos under one folder per task
(``DATA_LIST`` below, lmms-eval's ``mvbench/utils.py``), episodic_reasoning as folders of JPEG frames (read at
3 fps, as lmms-eval's llava_vid assumes). lmms-eval tasks ``mvbench_<task>`` (``lmms_eval/tasks/mvbench/``):
prompt = "Question:" + question + "\\nOption:\\n" + "(A) c0\\n(B) c1\\n..." + "Only give the best option.\\n";
scored with ``mcq_acc`` over the answers that are not empty; MVBench's average is the mean over the 20 tasks.

lmms-eval reads the dataset's ``video`` revision, whose segment tasks are already cut; with the original
uncut videos pass ``--bounds`` to extract the ``start`` / ``end`` window of each question instead.
"""

from __future__ import annotations

import argparse
import pathlib

from llavaction_jax.eval.benchmarks import common

DATA_LIST = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation", "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
POST_PROMPT = "Only give the best option.\n"
ALL = common.Variant("mvbench", "mvbench", "mvbench", 16, groups=("task",), aggregate="mvbench")
VARIANTS = (ALL,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-dir", required=True, help="the dataset's json/ folder ({task}.json for 20 tasks)")
    parser.add_argument("--tasks", nargs="+", default=sorted(DATA_LIST), choices=sorted(DATA_LIST), metavar="TASK",
                        help="tasks to include (default: all 20)")
    parser.add_argument("--bounds", action="store_true",
                        help="cut each question's start/end window from uncut videos (default: lmms-eval's "
                             "pre-cut 'video' revision, whole files)")


def prompt(text: str, options: list[str]) -> str:
    return "Question:" + text + "\nOption:\n" + "".join(f"({chr(65 + k)}) {o}\n" for k, o in enumerate(options)) \
        + POST_PROMPT


def build(args) -> list[common.Built]:
    questions, clips, inputs = [], {}, {}
    for task in args.tasks:
        path = pathlib.Path(args.json_dir) / f"{task}.json"
        inputs[task] = str(path)
        for i, row in enumerate(common.read_rows(path)):
            where = f"{path}: question {i}"
            options = [str(c) for c in common.field(row, "candidates", where)]
            answer = str(common.field(row, "answer", where))
            if answer not in options:
                raise ValueError(f"{where}: answer {answer!r} is not one of its candidates {options}")
            video = f"{DATA_LIST[task]}/{common.field(row, 'video', where)}"
            clip, uid = {"video": video}, video
            if args.bounds and row.get("start") is not None and row.get("end") is not None:
                clip.update(start=float(row["start"]), end=float(row["end"]))
                uid = f"{video}_{clip['start']:.2f}_{clip['end']:.2f}"
            clips[uid] = clip
            questions.append(common.question(f"{task}-{i}", uid, row["question"], options,
                                             chr(65 + options.index(answer)), prompt(row["question"], options),
                                             groups={"task": task}))
    return [common.Built(ALL, questions, clips, inputs)]
