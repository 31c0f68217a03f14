"""The paper's other video benchmarks: each one's official annotation format (written here, field by field, as the
benchmark distributes it) through build-bench, frame extraction from real videos (MP4 and WebM by PyAV, a GIF by
Pillow, a folder of JPEG frames), the suite evaluation with a tiny random model, and the official scoring against
hand-computed values. Expected prompts are written out by hand from lmms-eval's task code (docs/benchmarks.md)."""

import argparse
import dataclasses
import json

import av
import jax
import numpy as np
import pytest
from PIL import Image

from _cli_e2e import run_cli
from llavaction_jax import cli
from llavaction_jax.api import generation_config
from llavaction_jax.data import chat
from llavaction_jax.data.frames import FrameShards
from llavaction_jax.data.tokenizer import default_tokenizer
from llavaction_jax.eval import batching, mqa_eval, questions as qs, runner
from llavaction_jax.eval.benchmarks import VARIANTS, longvideobench, mvbench, parsers, score, suite, videomme
from llavaction_jax.model import llava
from llavaction_jax.sharding import local_rows, make_mesh, resolve_execution, shard_batch, use_mesh
from _video_fixtures import known_frames, write_mp4

VOCAB = 151680  # the tiny preset with a vocabulary that covers the bundled Qwen2 tokenizer
INSTRUCTION = "Answer with the option's letter from the given choices directly."
NUM_FRAMES = 4


# ------------------------------------------------------------------------------- official-format fixtures
def _font(text):
    return f'<font color="white" size=".72c">{text}</font>'


SRT = (f"1\n00:00:00,000 --> 00:00:00,500\n{_font('hello')}\n\n"
       f"2\n00:00:00,500 --> 00:00:01,000\n{_font('world')}\n\n"
       f"3\n00:00:01,000 --> 00:00:01,100\n{_font('hidden')}\n\n"  # frames 10-10: none of 0, 6, 12, 19 sampled
       "4\n00:00:01,800 --> 00:00:02,000\nno font tag\n\n")  # shown at frame 19 but has no <font> text


def write_official_files(root):
    """Each benchmark's annotation files in its distributed layout, and its videos (20 frames at 10 fps)."""
    video = known_frames(0, 20)
    ann = root / "ann"
    ann.mkdir()
    # EgoSchema: questions.json (all) + subset_answers.json (the public subset)
    ego = [{"q_uid": f"ego{i}", "google_drive_id": f"g{i}", "question": f"What did c do {i}?",
            **{f"option {k}": f"c does thing {k}" for k in range(5)}} for i in range(3)]
    (ann / "questions.json").write_text(json.dumps(ego))
    (ann / "subset_answers.json").write_text(json.dumps({"ego0": 3, "ego2": 0}))
    # PerceptionTest: mc_question_valid.json keyed by video id
    pt = {f"video_{v}": {"metadata": {"video_id": f"video_{v}", "num_frames": 20, "split": "valid"},
                         "mc_question": [{"id": q, "question": f"Is it {v}{q}?", "options": ["yes", "no", "maybe"],
                                          "answer_id": (v + q) % 3, "area": ["memory", "physics"][q],
                                          "reasoning": "descriptive", "tag": ["t"]} for q in range(2 - v)]}
          for v in range(2)}
    (ann / "mc_question_valid.json").write_text(json.dumps(pt))
    # LongVideoBench: lvb_val.json
    lvb = [{"id": f"lvb{i}", "video_id": f"v{i}", "video_path": f"v{i}.mp4", "question": f"When {i}?",
            "candidates": ["early", "late", "never"][: 2 + i], "correct_choice": i, "duration_group": [15, 600][i],
            "question_category": "TOS", "duration": 2.0, "subtitle_path": f"v{i}_en.json",
            "starting_timestamp_for_subtitles": 0.0} for i in range(2)]
    (ann / "lvb_val.json").write_text(json.dumps(lvb))
    # Video-MME: the parquet's rows as JSON (same fields), subtitles subtitle/{videoID}.srt
    mme = [{"video_id": f"00{v}", "duration": ["short", "long"][v], "domain": "Knowledge", "sub_category": "Law",
            "url": "https://www.youtube.com/watch?v=x", "videoID": f"vid{v}", "question_id": f"00{v}-{q}",
            "task_type": "Counting Problem", "question": f"How many {v}{q}?",
            "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[(v + q) % 4]}
           for v in range(2) for q in range(2 - v)]
    (ann / "videomme.json").write_text(json.dumps(mme))
    (ann / "subtitle").mkdir()
    (ann / "subtitle" / "vid0.srt").write_text(SRT)  # vid1 has none: "No subtitles available"
    # MVBench: json/{task}.json
    (ann / "json").mkdir()
    (ann / "json" / "fine_grained_action.json").write_text(json.dumps(
        [{"video": "mit1.gif", "question": "What is the action?", "candidates": ["running", "jumping"],
          "answer": "jumping"}]))
    (ann / "json" / "action_antonym.json").write_text(json.dumps(
        [{"video": "ssv2_1.webm", "question": "What is happening?", "candidates": ["pushing", "not sure", "pulling"],
          "answer": "pulling"}]))
    (ann / "json" / "episodic_reasoning.json").write_text(json.dumps(
        [{"video": "tv1", "question": "Who speaks?", "candidates": ["Ross", "Joey", "Monica"], "answer": "Ross",
          "start": 0.0, "end": 2.0}]))
    # NExT-QA: test.csv + map_vid_vidorID.json
    header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
    (ann / "test.csv").write_text(header + "4010069381,20,64,48,why did the boy fall,2,6,CW,a,b,c,d,e\n"
                                  + "4010069381,20,64,48,what is next ,0,7,TN,f,g,h,i,j\n")
    (ann / "map_vid_vidorID.json").write_text(json.dumps({"4010069381": "1006/4010069381"}))
    # videos, where each benchmark keeps them
    for path in ["ego/ego0.mp4", "ego/ego1.mp4", "ego/ego2.mp4", "pt/video_0.mp4", "pt/video_1.mp4",
                 "lvb/v0.mp4", "lvb/v1.mp4", "mme/vid0.mp4", "mme/vid1.mp4", "next/1006/4010069381.mp4"]:
        write_mp4(root / "videos" / path, video, fps=10)
    write_webm(root / "videos" / "mvb" / "ssv2_video_mp4" / "ssv2_1.webm", video)
    gif = root / "videos" / "mvb" / "Moments_in_Time_Raw" / "videos" / "mit1.gif"
    gif.parent.mkdir(parents=True)
    images = [Image.fromarray(f) for f in video[:8]]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=100, loop=0)
    frames_dir = root / "videos" / "mvb" / "tvqa" / "video_fps3_hq_segment" / "tv1"
    frames_dir.mkdir(parents=True)
    for i, frame in enumerate(video[:6]):
        Image.fromarray(frame).save(frames_dir / f"{i + 1:05d}.jpg")
    return ann


def write_webm(path, frames: np.ndarray, fps: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


BUILDS = {  # benchmark -> (build-bench arguments, video root)
    "egoschema": (["--questions", "ann/questions.json", "--answers", "ann/subset_answers.json"], "ego"),
    "perceptiontest": (["--annotations", "ann/mc_question_valid.json"], "pt"),
    "longvideobench": (["--annotations", "ann/lvb_val.json"], "lvb"),
    "videomme": (["--annotations", "ann/videomme.json", "--subtitles", "ann/subtitle", "--videos", "videos/mme",
                  "--subtitle-frames", "4"], "mme"),
    "mvbench": (["--json-dir", "ann/json", "--tasks", "fine_grained_action", "episodic_reasoning", "action_antonym"],
                "mvb"),
    "nextqa": (["--annotations", "ann/test.csv", "--video-map", "ann/map_vid_vidorID.json"], "next"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build-bench for every benchmark, then extract-frames for every variant; returns the root."""
    root = tmp_path_factory.mktemp("bench")
    write_official_files(root)
    for name, (args, videos) in BUILDS.items():
        args = [str(root / a) if a.startswith(("ann/", "videos/")) else a for a in args]
        assert run_cli(["build-bench", name, *args, "--out", str(root / "data")]) == 0
        for variant in [v for v in VARIANTS.values() if v.benchmark == name]:
            folder = root / "data" / variant.name
            assert cli.main(["extract-frames", "--jsonl", str(folder / "clips.jsonl"), "--video-root",
                             str(root / "videos" / videos), "--out", str(folder / "shards"), "--sampling",
                             "llava-video", "--frames-upbound", str(NUM_FRAMES), "--frame-size", "64", "--workers",
                             "1"]) == 0  # lmms-eval's sampling: the 2 s videos get 1 frame per second
    return root


def questions_of(root, variant):
    return [json.loads(line) for line in (root / "data" / variant / "questions.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- builders: prompts by hand
@pytest.mark.cli_e2e("build-bench egoschema", "build-bench perceptiontest", "build-bench longvideobench",
                     "build-bench videomme", "build-bench mvbench", "build-bench nextqa")
def test_builders_write_lmms_eval_prompts_answers_and_groups(built):
    ego = questions_of(built, "egoschema_subset")
    assert [q["question_id"] for q in ego] == ["ego0", "ego2"] and [q["answer"] for q in ego] == ["D", "A"]
    assert ego[0]["prompt"] == ("What did c do 0?\nA. c does thing 0\nB. c does thing 1\nC. c does thing 2\n"
                                f"D. c does thing 3\nE. c does thing 4\n{INSTRUCTION}")
    full = questions_of(built, "egoschema")
    assert [q["answer"] for q in full] == [None] * 3 and [q["submission_key"] for q in full] == ["ego0", "ego1", "ego2"]

    pt = questions_of(built, "perceptiontest_val_mc")
    assert [(q["question_id"], q["answer"]) for q in pt] == [("video_0-0", "A"), ("video_0-1", "B"), ("video_1-0", "B")]
    assert pt[1]["prompt"] == f"Is it 01?\nA. yes\nB. no\nC. maybe\n{INSTRUCTION}"
    assert pt[1]["groups"] == {"area": "physics", "reasoning": "descriptive"}

    lvb = questions_of(built, "longvideobench_val_v")
    assert lvb[1]["prompt"] == f"When 1?\nA. early\nB. late\nC. never\n{INSTRUCTION}\n"
    assert [q["answer"] for q in lvb] == ["A", "B"] and lvb[1]["groups"]["duration_group"] == "600"

    option_prompt = ("Select the best answer to the following multiple-choice question based on the video and the "
                     "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
    body = f"{option_prompt}\nHow many 00?\nA. one\nB. two\nC. three\nD. four\nThe best answer is:"
    plain, subbed = questions_of(built, "videomme"), questions_of(built, "videomme_w_subtitle")
    assert plain[0]["prompt"] == body and plain[0]["options"] == ["one", "two", "three", "four"]
    assert subbed[0]["prompt"] == "This video's subtitles are listed below: \nhello\nworld\n" + body
    assert subbed[2]["prompt"].startswith("This video's subtitles are listed below: \nNo subtitles available\n")
    assert [q["groups"]["duration"] for q in plain] == ["short", "short", "long"]

    mvb = questions_of(built, "mvbench")
    assert mvb[0]["prompt"] == ("Question:What is the action?\nOption:\n(A) running\n(B) jumping\n"
                                "Only give the best option.\n")
    assert [(q["answer"], q["groups"]["task"]) for q in mvb] == [("B", "fine_grained_action"),
                                                                 ("A", "episodic_reasoning"), ("C", "action_antonym")]
    assert mvb[1]["clip_uid"] == "tvqa/video_fps3_hq_segment/tv1"  # lmms-eval's pre-cut clips: no --bounds window

    nq = questions_of(built, "nextqa_mc_test")
    assert nq[1]["prompt"] == "what is next\nA. f\nB. g\nC. h\nD. i\nE. j"  # no closing instruction in lmms-eval
    assert nq[0]["clip_uid"] == "1006/4010069381.mp4" and nq[0]["answer"] == "C"
    assert nq[0]["groups"] == {"type_group": "causal", "type": "CW"}
    # the meta records llava_vid's settings as the authors ran it (max_frames_num=64, mm_spatial_pool_mode=average)
    for variant in VARIANTS:
        settings = json.loads((built / "data" / variant / "questions.jsonl.meta.json").read_text())["settings"]
        assert settings == {"time_instruction": "none", "pool_mode": "average", "max_frames_num": 64}


def test_build_bench_pooling_and_frame_cap_are_overridable(built):
    assert cli.main(["build-bench", "nextqa", "--annotations", str(built / "ann" / "test.csv"), "--video-map",
                     str(built / "ann" / "map_vid_vidorID.json"), "--out", str(built / "bilinear"), "--pool-mode",
                     "bilinear", "--max-frames-num", "32"]) == 0
    meta = json.loads((built / "bilinear" / "nextqa_mc_test" / "questions.jsonl.meta.json").read_text())
    assert meta["settings"]["pool_mode"] == "bilinear" and meta["settings"]["max_frames_num"] == 32
    assert mqa_eval.file_settings(meta)["max_new_tokens"] == VARIANTS["nextqa_mc_test"].max_new_tokens


def test_eval_prompts_are_lmms_eval_llava_vid_prompts(built):
    """What the model reads: llava_vid's "<image>\n" + doc_to_text in the qwen_1_5 template, with or without its
    time instruction."""
    _, _, questions = qs.load_questions(built / "data" / "nextqa_mc_test" / "questions.jsonl")
    user = questions[1].user_message(12.5, 4, True, "", (0.0, 4.0, 8.0, 12.0))
    assert chat.build_inference_prompt(user) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nwhat is next\n"
        "A. f\nB. g\nC. h\nD. i\nE. j<|im_end|>\n<|im_start|>assistant\n")
    timed = dataclasses.replace(questions[1], time_style="lmms-eval")
    assert timed.user_message(12.5, 4, True, "", (0.0, 4.0, 8.0, 12.0)) == (
        "<image>\nThe video lasts for 12.50 seconds, and 4 frames are uniformly sampled from it. These frames are "
        "located at 0.00s,4.00s,8.00s,12.00s.Please answer the following questions related to this video.\n"
        "what is next\nA. f\nB. g\nC. h\nD. i\nE. j")
    assert timed.user_message(12.5, 4, False, "", ()) == user  # eval --no-time-instruction


def test_other_official_layouts_mvbench_windows_and_hf_rows(tmp_path):
    ns = argparse.Namespace(json_dir=str(tmp_path), tasks=["episodic_reasoning"], bounds=True)
    (tmp_path / "episodic_reasoning.json").write_text(json.dumps(
        [{"video": "tv1", "question": "Who?", "candidates": ["a", "b"], "answer": "b", "start": 1.5, "end": 4.25}]))
    built = mvbench.build(ns)[0]
    assert built.questions[0]["clip_uid"] == "tvqa/video_fps3_hq_segment/tv1_1.50_4.25"
    assert built.clips == {"tvqa/video_fps3_hq_segment/tv1_1.50_4.25": {
        "video": "tvqa/video_fps3_hq_segment/tv1", "start": 1.5, "end": 4.25}}
    row = {"option0": "x", "option1": "y", "option2": "N/A", "option3": "N/A", "option4": "N/A"}
    assert longvideobench.candidates(row, "here") == ["x", "y"]  # the Hugging Face rows of LongVideoBench
    per_video = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Law",
                  "videoID": "abc", "questions": [{"question_id": "001-1", "task_type": "OCR Problems",
                                                   "question": "Q?", "options": ["A. a", "B. b"], "answer": "B"}]}]
    (tmp_path / "mme.json").write_text(json.dumps(per_video))  # Video-MME's own per-video JSON
    assert videomme.rows_of(tmp_path / "mme.json") == [{**{k: v for k, v in per_video[0].items() if k != "questions"},
                                                         **per_video[0]["questions"][0]}]


def test_a_built_folder_is_not_overwritten_and_bad_annotations_name_the_record(built, capsys):
    args = ["build-bench", "longvideobench", "--annotations", str(built / "ann" / "lvb_val.json"), "--out",
            str(built / "data")]
    assert cli.main(args) == 2
    assert "already holds a built benchmark" in capsys.readouterr().err
    bad = built / "ann" / "bad_lvb.json"
    bad.write_text(json.dumps([{"id": "x", "question": "q", "candidates": ["a", "b"], "correct_choice": 4,
                                "video_path": "v.mp4"}]))
    assert cli.main(["build-bench", "longvideobench", "--annotations", str(bad), "--out", str(built / "o2")]) == 2
    assert "bad_lvb.json: question 0: correct_choice 4 is not an index of its 2 candidates" in capsys.readouterr().err


def test_videomme_subtitles_follow_the_sampled_frames(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    # 20 frames at 10 fps, 4 sampled: linspace(0, 19, 4) = 0, 6, 12, 19 -> "hello" (0-4), "world" (5-9); "hidden"
    # (10) is between samples; frame 19's subtitle has no <font> text.
    assert videomme.subtitle_text(tmp_path / "a.srt", 10.0, 20, 4) == "hello\nworld"
    assert videomme.subtitle_text(tmp_path / "a.srt", 10.0, 20, -1) == "hello\nworld\nhidden"


# ------------------------------------------------------------------------------- frames
def test_frame_folders_and_gifs_become_clips_with_lmms_eval_frame_times(built):
    shards = FrameShards(built / "data" / "mvbench" / "shards")
    tv = shards.lookup("tvqa/video_fps3_hq_segment/tv1")
    # a folder: linspace(0, 5, 4) over 6 JPEGs at 3 fps, though 1 fps would give 2 (llava_vid's MVBench branch)
    assert tv.fps == 3.0 and tv.frame_indices == (0, 1, 3, 5)
    gif = shards.lookup("Moments_in_Time_Raw/videos/mit1.gif")  # 8 frames at 10 fps: one per second
    assert gif.fps == 10.0 and gif.frame_indices == (0,)
    webm = shards.lookup("ssv2_video_mp4/ssv2_1.webm")  # VP9 in WebM, as Something-Something v2 ships
    assert webm.fps == 10.0 and webm.frame_indices == (0, 10)
    assert shards.frames_per_clip is None and shards.max_frames_per_clip == NUM_FRAMES
    _, _, questions = qs.load_questions(built / "data" / "mvbench" / "questions.jsonl")
    loader = batching.ClipLoader(shards, NUM_FRAMES, 64, threads=1)
    uid, pixels, duration, times = loader.load(questions[1])
    loader.pool.shutdown()
    assert pixels.shape == (NUM_FRAMES, 3, 64, 64) and duration == pytest.approx(2.0)
    assert times == pytest.approx((0.0, 1 / 3, 1.0, 5 / 3))
    message = qs.lmms_eval_time_prompt("<image>\nQ", duration, NUM_FRAMES, times)
    assert message == ("<image>\nThe video lasts for 2.00 seconds, and 4 frames are uniformly sampled from it. These "
                       "frames are located at 0.00s,0.33s,1.00s,1.67s.Please answer the following questions related "
                       "to this video.\nQ")


# ------------------------------------------------------------------------------- parsers and metrics by hand
@pytest.mark.parametrize("parser, raw, expected", [
    ("mmmu_first", "C. because A is wrong", "C"),  # "A " and "C." found; C's last occurrence comes first
    ("mmmu_first", "I think the person is cooking food in the kitchen", None),
    ("mmmu_last", "A or B", "B"),  # the later " B " wins
    ("mmmu_last", "(C)", "C"),
    ("first_word_letter", "Answer: B", "B"),  # the A of "Answer" is not a standalone letter
    ("mcq_extract", "The best answer is: C", "C"),
    ("mcq_extract", "(B) two, not A.", "A"),  # a standalone letter at the end outranks "(B)"
    ("lvb_first_letter", "The best answer is D.", "D"),
    ("lvb_first_letter", "Based on the video, C", "B"),  # lmms-eval takes the first A-E anywhere: the B of Based
    ("mvbench", "(A) cat", "A"),
    ("mvbench", "none of them", None),
])
def test_parsers_read_answers_as_lmms_eval_does(parser, raw, expected):
    options = ["A. cat", "B. dog", "C. cow", "D. owl", "E. ant"]
    assert parsers.PARSERS[parser](raw, options) == expected


def pred(raw, gt, groups, options=4, key=None):
    p = {"options": [f"{'ABCDE'[k]}. o{k}" for k in range(options)], "gt_letter": gt, "groups": groups,
         "generate": {"raw": raw}, "score": {"letter": "A"}}
    return {**p, "submission_key": key} if key else p


def test_videomme_and_longvideobench_accuracy_and_breakdowns_by_hand():
    preds = [pred("B", "B", {"duration": "short"}), pred("The best answer is: C", "D", {"duration": "short"}),
             pred("I think (A)", "A", {"duration": "medium"}), pred("", "A", {"duration": "long"})]
    stats = score.score_mode(preds, "generate", VARIANTS["videomme"])
    assert (stats["n"], stats["correct"], stats["accuracy"], stats["unparsed"]) == (4, 2, 0.5, 1)
    assert {k: v["accuracy"] for k, v in stats["breakdowns"]["duration"].items()} == {"long": 0.0, "medium": 1.0,
                                                                                       "short": 0.5}
    scored = score.score_mode(preds, "score", VARIANTS["videomme"])  # always "A": right on 2 of 4
    assert scored["accuracy"] == 0.5
    preds = [pred("Based on the video, C", "B", {"duration_group": "15"}), pred("D", "C", {"duration_group": "600"})]
    stats = score.score_mode(preds, "generate", VARIANTS["longvideobench_val_v"])
    assert stats["accuracy"] == 0.5 and stats["breakdowns"]["duration_group"]["15"]["correct"] == 1


def test_perceptiontest_and_nextqa_accuracy_and_breakdowns_by_hand():
    preds = [pred("Answer: B", "B", {"area": "memory"}, 3), pred("D", "C", {"area": "memory"}, 3),
             pred("A dog", "A", {"area": "physics"}, 3)]
    stats = score.score_mode(preds, "generate", VARIANTS["perceptiontest_val_mc"])
    assert (stats["correct"], stats["n"]) == (2, 3)
    assert stats["breakdowns"]["area"]["memory"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    preds = [pred("A or B", "B", {"type_group": "causal", "type": "CW"}, 5),
             pred("(C)", "C", {"type_group": "temporal", "type": "TN"}, 5),
             pred("E.", "D", {"type_group": "temporal", "type": "TC"}, 5)]
    stats = score.score_mode(preds, "generate", VARIANTS["nextqa_mc_test"])
    assert stats["accuracy"] == pytest.approx(2 / 3)
    assert {k: v["accuracy"] for k, v in stats["breakdowns"]["type_group"].items()} == {"causal": 1.0,
                                                                                         "temporal": 0.5}


def test_mvbench_averages_tasks_over_non_empty_answers_by_hand():
    preds = [pred("(A) cat", "A", {"task": "t1"}), pred("  ", "A", {"task": "t1"}),
             pred("B. dog", "C", {"task": "t2"}), pred("none", "B", {"task": "t2"})]
    stats = score.score_mode(preds, "generate", VARIANTS["mvbench"])
    assert stats["breakdowns"]["task"]["t1"] == {"n": 1, "correct": 1, "accuracy": 1.0}  # the empty answer skipped
    assert stats["breakdowns"]["task"]["t2"]["accuracy"] == 0.0
    assert stats["task_mean"] == stats["headline"] == 0.5 and stats["accuracy"] == pytest.approx(1 / 3)


def test_egoschema_full_set_writes_the_server_submission(tmp_path):
    preds = [pred("C.", None, {}, 5, "q1"), pred("nothing readable here at all", None, {}, 5, "q2")]
    meta = {"format": "llavaction_jax.benchmark", "variant_spec": {**VARIANTS["egoschema"].__dict__}}
    section = score.benchmark_results(meta, preds)
    assert section["submission"] == {"generate": {"q1": 2, "q2": -1}, "score": {"q1": 0, "q2": 0}}
    (tmp_path / "report.md").write_text("# report\n")
    assert score.write_outputs({"benchmark": section}, tmp_path) == ["egoschema_submission.json",
                                                                     "egoschema_submission.score.json"]
    assert json.loads((tmp_path / "egoschema_submission.json").read_text()) == {"q1": 2, "q2": -1}
    assert "official server" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------- the suite, end to end
@pytest.fixture(scope="module")
def suite_model(built):
    """eval-suite's arguments and its tiny random model (a vocabulary that covers the bundled tokenizer), on one
    device."""
    overrides = [f"text.vocab_size={VOCAB}", "text.tie_word_embeddings=true", "text.hidden_size=64",
                 "text.intermediate_size=128"]
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    args, args.config_overrides = parser.parse_known_args(
        ["--data", str(built / "data"), "--out", str(built / "out"), "--preset", "tiny", "--batch-size", "8",
         "--max-new-tokens", "3", "--prompt-len", "288", "--options-per-pass", "5",
         *[f"--config.model.{o}" for o in overrides]])
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    params, cfg, execution, name = mqa_eval.load_model(args, mesh)
    return args, params, cfg, execution, name, mesh


@pytest.fixture(scope="module")
def suite_run(built, suite_model):
    """eval-suite --suite paper over all built variants with one tiny random model on one device, one compiled
    step for every benchmark (same prompt length, option layout, frames and budget)."""
    args, params, cfg, execution, name, mesh = suite_model
    logs = []
    suite.run_suite(args, params, cfg, name, mesh, default_tokenizer(), "bundled",
                    log=lambda *a, **k: logs.append(" ".join(map(str, a))), execution=execution)
    return built / "out", logs


def test_suite_scores_every_benchmark_the_official_way_and_writes_one_table(suite_run, built, capsys):
    out, logs = suite_run
    for variant in VARIANTS:
        results = json.loads((out / variant / "results.json").read_text())
        preds = [json.loads(line) for line in (out / variant / "predictions.jsonl").read_text().splitlines()]
        section = results["benchmark"]
        assert section["variant"] == variant and results["num_questions"] == len(questions_of(built, variant))
        assert section == score.benchmark_results(json.loads(
            (built / "data" / variant / "questions.jsonl.meta.json").read_text()), preds)  # recomputable
        if VARIANTS[variant].has_answers:
            stats = section["modes"]["generate"]
            expected = [parsers.PARSERS[VARIANTS[variant].parser](p["generate"]["raw"], p["options"])
                        == p["gt_letter"] for p in preds]
            assert stats["correct"] == sum(expected) and set(stats["breakdowns"]) == set(VARIANTS[variant].groups)
        assert f"## {variant} (official scoring" in (out / variant / "report.md").read_text()
    by_variant = {v: [json.loads(line) for line in (out / v / "predictions.jsonl").read_text().splitlines()]
                  for v in ("mvbench", "nextqa_mc_test")}
    assert [p["num_frames"] for p in by_variant["mvbench"]] == [1, 4, 2]  # each clip its own frames, padded to 4
    assert [p["num_frames"] for p in by_variant["nextqa_mc_test"]] == [2, 2]  # a 2 s video at 1 fps
    assert json.loads((out / "mvbench" / "results.json").read_text())["settings"]["layout"]["num_frames"] == 4
    # each file's pooling (build-bench's default: llava_vid's average, as the authors ran lmms-eval)
    assert {json.loads((out / v / "results.json").read_text())["model"]["pool_mode"] for v in VARIANTS} == {"average"}
    submission = json.loads((out / "egoschema" / "egoschema_submission.json").read_text())
    assert set(submission) == {"ego0", "ego1", "ego2"} and all(-1 <= v < 5 for v in submission.values())
    assert cli.main(["eval-suite", "--data", str(built / "data"), "--out", str(out), "--table-only"]) == 0
    table = json.loads((out / "suite.json").read_text())
    assert [r["variant"] for r in table["rows"]] == [v for v, _ in suite.SUITES["paper"]]
    assert all(r["status"] == "ok" for r in table["rows"] if r["variant"] != "egoschema")
    markdown = (out / "suite.md").read_text()
    assert "| MVBench |" in markdown and "61.1" in markdown and "NExT-QA (MC)" in capsys.readouterr().out


def test_a_padded_batch_of_clips_with_different_frame_counts_answers_as_each_clip_alone(built, suite_model):
    """MVBench's clips have 1 (GIF, 1 fps), 4 (frame folder) and 2 (WebM) frames. One eval batch pads them to 4 (and
    fills its other rows): the greedy answer and option scores of each padded clip equal those of the clip run
    alone (its own frames, an uncached forward pass); with lmms-eval's time instruction each prompt states the
    clip's own frames. The batch has the suite's shapes, so its generate step is already compiled (test order only
    saves time)."""
    _, params, cfg, execution, _, mesh = suite_model
    cfg = cfg.replace(pool_mode="average")  # the suite's, from the question file
    tokenizer = default_tokenizer()
    _, _, questions = qs.load_questions(built / "data" / "mvbench" / "questions.jsonl")
    questions = [dataclasses.replace(q, time_style="lmms-eval") for q in questions]
    builder = batching.PromptBuilder(tokenizer, True, INSTRUCTION)
    layout = builder.layout(questions, 8, NUM_FRAMES, cfg.vision.image_size, prompt_len=288, options_per_pass=5)
    loader = batching.ClipLoader(FrameShards(built / "data" / "mvbench" / "shards"), NUM_FRAMES,
                                 cfg.vision.image_size, threads=1)
    arrays, info = batching.build_batch([0, 1, 2], questions, 0, layout, builder, loader)
    loader.pool.shutdown()
    counts = [1, 4, 2]
    assert arrays["num_frames"].tolist() == counts + [1] * 5 and [r["num_frames"] for r in info] == counts
    assert arrays["pixel_values"].shape[1] == NUM_FRAMES
    assert not arrays["pixel_values"][0, 1:].any() and not arrays["pixel_values"][2, 2:].any()
    prompts = [tokenizer.decode(ids[mask & (ids >= 0)]) for ids, mask in zip(arrays["input_ids"],
                                                                            arrays["attention_mask"])]
    assert "and 1 frames are uniformly sampled from it. These frames are located at 0.00s.Please" in prompts[0]
    assert "and 2 frames are uniformly sampled from it. These frames are located at 0.00s,1.00s.Please" in prompts[2]
    assert "and 4 frames are uniformly sampled" in prompts[1]

    gen = generation_config(tokenizer, 3, cfg.text.vocab_size, None)
    answer = runner.make_step(params, cfg, mesh, layout, gen, ("generate", "score"), execution)
    padded = local_rows(answer(shard_batch(arrays, mesh)), mesh)
    resolved = resolve_execution(execution, mesh)
    for row, n in ((0, 1), (2, 2)):  # the padded clips alone: their own frames only
        prompt = arrays["input_ids"][row][arrays["attention_mask"][row]].tolist()
        answer = padded["generate"]["tokens"][row, : padded["generate"]["num_tokens"][row]].tolist()
        options = [ids[mask].tolist() for ids, mask in zip(arrays["option_ids"][row], arrays["option_mask"][row])]
        options = [o for o in options if o]
        greedy, logprobs = alone_reference(params, cfg, resolved, mesh, prompt, arrays["pixel_values"][row, :n],
                                           [answer] + options, gen.vocab_limit)
        assert answer == greedy[0][: len(answer)]  # each generated token is the alone model's argmax
        np.testing.assert_allclose(padded["score"]["logprob_sum"][row, : len(options)],
                                   [sum(lp) for lp in logprobs[1:]], rtol=1e-5, atol=1e-5)


def alone_reference(params, cfg, execution, mesh, prompt, frames, continuations, vocab_limit):
    """One clip alone, without padding or KV cache: one forward pass over prompt + each continuation (a row each,
    the clip's frames repeated), then per row the argmax token and the log-probability of the continuation's
    tokens at each of its positions."""
    width = len(prompt) + max(map(len, continuations))
    ids = np.zeros((len(continuations), width), np.int32)
    for r, tokens in enumerate(continuations):
        ids[r, : len(prompt) + len(tokens)] = prompt + tokens
    mask = np.arange(width)[None] < np.asarray([len(prompt) + len(t) for t in continuations])[:, None]
    pixels = np.repeat(frames[None], len(continuations), axis=0)
    with use_mesh(mesh):
        hidden = jax.jit(llava.forward, static_argnums=(1, 2))(params, cfg, execution, ids, pixels, mask).hidden
        logprobs = np.asarray(jax.nn.log_softmax(llava.lm_logits(params, hidden, vocab_limit), axis=-1))
    start = len(prompt) - 2 + cfg.tokens_per_video(len(frames))  # predicts the first token after the prompt
    steps = [range(start, start + len(t)) for t in continuations]
    greedy = [[int(logprobs[r, p].argmax()) for p in ps] for r, ps in enumerate(steps)]
    picked = [[float(logprobs[r, p, t]) for p, t in zip(ps, tokens)]
              for r, (ps, tokens) in enumerate(zip(steps, continuations))]
    return greedy, picked


def test_eval_suite_on_the_command_line_counts_an_unreadable_clip_wrong_unless_strict(built, tmp_path):
    """`eval-suite` end to end in its own one-device process: a question whose clip the shards do not hold is a
    failed record, counted wrong in the official score and listed in results.json; --strict stops instead."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import COLLECTIVE_FLAGS

    data = tmp_path / "data"
    shutil.copytree(built / "data" / "mvbench", data / "mvbench")
    file = data / "mvbench" / "questions.jsonl"
    records = [json.loads(line) for line in file.read_text().splitlines()]
    for key in ("start", "end"):
        records[0].pop(key, None)
    records[0].update(clip_uid="gone", video="gone.mp4")
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [f"text.vocab_size={VOCAB}", "text.tie_word_embeddings=true", "text.hidden_size=64",
                 "text.intermediate_size=128"]
    command = [sys.executable, "-m", "llavaction_jax", "eval-suite", "--data", str(data), "--preset", "tiny",
               "--batch-size", "4", "--max-new-tokens", "3", "--mesh", "data=1,fsdp=1,tensor=1",
               *[f"--config.model.{o}" for o in overrides]]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + COLLECTIVE_FLAGS)
    run = lambda *extra: subprocess.run(command + list(extra), env=env, capture_output=True, text=True, timeout=600)
    done = run("--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "mvbench" / "results.json").read_text())
    assert [f["clip_uid"] for f in results["failed"]] == ["gone"] and "KeyError" in results["failed"][0]["error"]
    assert results["benchmark"]["modes"]["generate"]["n"] == len(records)  # counted, wrong
    assert (tmp_path / "out" / "suite.md").is_file()
    strict = run("--out", str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 2 and strict.stderr.strip().splitlines()[-1].startswith(
        f"eval-suite: error: 1 questions have no clip in {data / 'mvbench' / 'shards'}"), strict.stderr
