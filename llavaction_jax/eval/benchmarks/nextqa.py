"""NExT-QA multiple choice (doc-doc/NExT-QA), the test split lmms-eval scores.

Official files: ``test.csv`` (or val.csv) with columns video, frame_count, width, height, question, answer (0-4),
qid, type (CW/CH causal, TN/TC/TP temporal, DL/DC/DO descriptive), a0-a4; videos ``NExTVideo/{dir}/{video}.mp4``
mapped by ``map_vid_vidorID.json`` ({video: "dir/vidorid"}), or flat ``{video}.mp4`` as lmms-eval's copy has
them. lmms-eval task ``nextqa_mc_test`` (``lmms_eval/tasks/nextqa/``): prompt = question, "A. a0" ... "E. a4" one
per line, and no closing instruction; MMMU-style letter parsing; metric: exact match. We add NExT-QA's official
causal / temporal / descriptive breakdown.
"""

from __future__ import annotations

import argparse

from llavaction_jax.eval.benchmarks import common

MC_TEST = common.Variant("nextqa_mc_test", "nextqa", "mmmu_last", 1024, groups=("type_group", "type"))
VARIANTS = (MC_TEST,)
TYPE_GROUPS = {"C": "causal", "T": "temporal", "D": "descriptive"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="test.csv (NExT-QA MC)")
    parser.add_argument("--video-map", default=None,
                        help="map_vid_vidorID.json: videos under {dir}/{video}.mp4 (default: flat {video}.mp4)")


def prompt(text: str, options: list[str]) -> str:
    return "\n".join([text.strip()] + [f"{'ABCDE'[k]}. {o.strip()}" for k, o in enumerate(options)])


def build(args) -> list[common.Built]:
    rows = common.read_rows(args.annotations)
    video_map = common.read_json(args.video_map) if args.video_map else None
    questions, clips = [], {}
    for line, row in enumerate(rows, start=2):
        where = f"{args.annotations}:{line}"
        video_id = str(common.field(row, "video", where))
        options = [str(common.field(row, f"a{k}", where)) for k in range(5)]
        answer = int(common.field(row, "answer", where))
        if not 0 <= answer < 5:
            raise ValueError(f"{where}: answer {answer} is not an option index 0-4")
        if video_map is not None and video_id not in video_map:
            raise ValueError(f"{where}: video {video_id} is not in {args.video_map}")
        video = f"{video_map[video_id]}.mp4" if video_map is not None else f"{video_id}.mp4"
        clips[video] = {"video": video}
        kind = str(row.get("type", ""))
        questions.append(common.question(
            f"{video_id}_{common.field(row, 'qid', where)}", video, common.field(row, "question", where),
            [o.strip() for o in options], "ABCDE"[answer], prompt(row["question"], options),
            groups={"type_group": TYPE_GROUPS.get(kind[:1], kind), "type": kind}))
    return [common.Built(MC_TEST, questions, clips, {"annotations": str(args.annotations),
                                                     "video_map": args.video_map})]
