"""Video-MME (BradyFU/Video-MME): 2700 4-way questions on 900 videos, short / medium / long, with and without
subtitles.

Official files (Hugging Face lmms-lab/Video-MME): ``videomme/test-00000-of-00001.parquet`` with rows {video_id,
duration: short / medium / long, domain, sub_category, url, videoID, question_id, task_type, question, options:
["A. ...", ...], answer: "A"}; the same rows as JSON / JSONL, or Video-MME's own per-video JSON ([{video_id,
duration, domain, sub_category, videoID?, url, questions: [{question_id, task_type, question, options, answer}]}])
are read too. Videos ``data/{videoID}.mp4``, subtitles ``subtitle/{videoID}.srt``.

lmms-eval tasks (``lmms_eval/tasks/videomme/``), with llava_vid's prompt settings: ``videomme`` = "Select the best
answer ... Respond with only the letter (A, B, C, or D) of the correct option.", the question, the options, "The
best answer is:"; ``videomme_w_subtitle`` puts "This video's subtitles are listed below: \\n" and the subtitle lines
in front, keeping the lines shown at ``frame_num`` (768 for llava_vid) frames spread over the video. Answers are
read with ``extract_mcq_answer`` (A-D); reported per duration, domain, sub-category and task type.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import numpy as np

from llavaction_jax.data.video import VideoCache
from llavaction_jax.eval.benchmarks import common

OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
SUBTITLES_PROMPT = "This video's subtitles are listed below: \n"
LLAVA_VID_SUBTITLE_FRAMES = 768  # lmms-eval's videomme_w_subtitle.yaml, llava_vid's frame_num
GROUPS = ("duration", "domain", "sub_category", "task_type")
PLAIN = common.Variant("videomme", "videomme", "mcq_extract", 16, groups=GROUPS)
SUBTITLED = common.Variant("videomme_w_subtitle", "videomme", "mcq_extract", 16, groups=GROUPS)
VARIANTS = (PLAIN, SUBTITLED)
_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True,
                        help="test-00000-of-00001.parquet (needs pyarrow), or its rows as JSON / JSONL, or "
                             "Video-MME's per-video JSON")
    parser.add_argument("--subtitles", default=None,
                        help="subtitle/ folder of {videoID}.srt; with --videos, also builds videomme_w_subtitle")
    parser.add_argument("--videos", default=None,
                        help="data/ folder of the videos (their frame rate and length place the subtitles)")
    parser.add_argument("--subtitle-frames", type=int, default=LLAVA_VID_SUBTITLE_FRAMES,
                        help="subtitles kept are those shown at this many frames spread over the video "
                             "(lmms-eval: 768 for llava_vid, 32 for other models; -1 = every frame)")


def rows_of(path) -> list[dict]:
    """Flat question rows from the parquet / JSON rows or the per-video JSON."""
    rows = []
    for entry in common.read_rows(path):
        if "questions" in entry:  # Video-MME's per-video layout
            video = {k: v for k, v in entry.items() if k != "questions"}
            video.setdefault("videoID", video.get("video_id"))
            rows += [{**video, **q} for q in entry["questions"]]
        else:
            rows.append(entry)
    return rows


def prompt(text: str, options: list[str], subtitles: str | None = None) -> str:
    body = OPTION_PROMPT + "\n" + text + "\n" + "\n".join(options) + "\n" + "The best answer is:"
    return body if subtitles is None else SUBTITLES_PROMPT + subtitles + "\n" + body


def _srt_seconds(text: str) -> float:
    hours, minutes, rest = text.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def read_srt(path) -> dict[tuple[float, float], str]:
    """{(start s, end s): text} of an .srt file, as lmms-eval's ``load_subtitles`` reads it (blocks split on blank
    lines, text lines joined with spaces; a repeated time range keeps its first position and its last text)."""
    subtitles = {}
    for block in pathlib.Path(path).read_text(encoding="utf-8").split("\n\n"):
        lines = block.split("\n")
        if block.strip() and len(lines) >= 3:
            start, end = lines[1].split(" --> ")
            subtitles[(_srt_seconds(start), _srt_seconds(end))] = " ".join(lines[2:])
    return subtitles


def subtitle_text(srt_path, fps: float, total_frames: int, frame_num: int) -> str:
    """lmms-eval's ``videomme_doc_to_text_subtitle``: the subtitles shown at ``frame_num`` frames spread with
    ``linspace`` over the video, each one's <font> text, joined by newlines."""
    by_frame = [(int(start * fps), int(end * fps), text) for (start, end), text in read_srt(srt_path).items()]
    frame_num = total_frames if frame_num == -1 else frame_num
    shown = [i for f in np.linspace(0, total_frames - 1, frame_num, dtype=int).tolist()
             for i, (start, end, _) in enumerate(by_frame) if start <= f < end]
    # list(set(...)) is lmms-eval's order (CPython's set order of small ints), kept so prompts match byte for byte.
    lines = [_FONT.findall(by_frame[i][2]) for i in list(set(shown))]
    return "\n".join(found[0] for found in lines if found)


def build(args) -> list[common.Built]:
    rows = rows_of(args.annotations)
    variants = [PLAIN] + ([SUBTITLED] if args.subtitles else [])
    if args.subtitles and not args.videos:
        raise ValueError("--subtitles needs --videos: subtitles are placed by the videos' frame rates and lengths")
    videos, cache = {}, VideoCache()
    built = []
    for variant in variants:
        questions, clips = [], {}
        for i, row in enumerate(rows):
            where = f"{args.annotations}: question {i}"
            video_id = str(common.field(row, "videoID", where))
            lettered = [str(o) for o in common.field(row, "options", where)]
            texts = [common.strip_letter(o, "ABCD"[k]) for k, o in enumerate(lettered)]
            answer = str(common.field(row, "answer", where)).strip()
            if answer not in "ABCD"[: len(texts)] or not answer:
                raise ValueError(f"{where}: answer {answer!r} is not a letter of its {len(texts)} options")
            video = f"{video_id}.mp4"
            clips[video] = {"video": video}
            subtitles = None
            if variant is SUBTITLED:
                srt = pathlib.Path(args.subtitles) / f"{video_id}.srt"
                if not srt.is_file():
                    subtitles = "No subtitles available"
                else:
                    if video not in videos:
                        opened = cache.open(str(pathlib.Path(args.videos) / video))
                        videos[video] = (opened.avg_fps, opened.num_frames)
                    subtitles = subtitle_text(srt, *videos[video], args.subtitle_frames)
            questions.append(common.question(
                common.field(row, "question_id", where), video, common.field(row, "question", where), texts, answer,
                prompt(row["question"], lettered, subtitles), groups={g: str(row.get(g, "")) for g in GROUPS}))
        built.append(common.Built(variant, questions, clips, {"annotations": str(args.annotations),
                                                               "subtitles": args.subtitles, "videos": args.videos}))
    return built
