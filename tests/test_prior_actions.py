"""Prior actions at test time (``build-mqa --prior-actions oracle | pseudo``) against a reference written in this file
from upstream's code (upstream @bd9f465: llavaction/action/generate_interval_pred.py: get_annotated_intervals,
get_lookup_dict, get_pseudo_dict; llavaction/action/utils.py: generate_label_map's key maps,
format_task_related_prompt, format_time_instruction, format_llava_prompt; llavaction/action/ek_eval.py:
evaluate_on_EK100's lookup key). For the same clip and the same options, the prompt must be byte-identical."""

import csv
import json
import os
from collections import defaultdict

import pytest
from test_ek100 import write_fake_annotations

from llavaction_jax.cli import main
from llavaction_jax.ek100 import labels, mqa


# ----------------------------------------------------------------------------- reference, from upstream's code
def ref_datetime2sec(text):
    hh, mm, ss = text.split(":")
    return int(hh) * 3600 + int(mm) * 60 + float(ss)


def ref_key_maps(anno_root):
    """generate_label_map's verb_maps / noun_maps (the 'key' branch)."""
    verb_maps, noun_maps = {}, {}
    with open(os.path.join(anno_root, "EPIC_100_verb_classes.csv")) as f:
        for row in csv.DictReader(f):
            verb_maps[str(row["id"])] = row["key"]
    with open(os.path.join(anno_root, "EPIC_100_noun_classes_v2.csv")) as f:
        for row in csv.DictReader(f):
            elements = row["key"].split(":")
            noun_maps[str(row["id"])] = " ".join(elements[1:] + [elements[0]]) if len(elements) > 1 else row["key"]
    return verb_maps, noun_maps


def ref_get_annotated_intervals(file_path, action_representation, verb_maps, noun_maps):
    reader = csv.reader(open(file_path))
    next(reader)
    vid_to_intervals, vid_to_action_representation = defaultdict(list), defaultdict(list)
    for row in reader:
        pid, vid = row[1:3]
        narration, verb_id, noun_id = row[8], int(row[10]), int(row[12])
        start_timestamp, end_timestamp = ref_datetime2sec(row[4]), ref_datetime2sec(row[5])
        vid_to_intervals[vid].append((start_timestamp, end_timestamp))
        if action_representation == "GT_random_narration":
            vid_to_action_representation[vid].append(narration)
        elif action_representation == "official_key":
            vid_to_action_representation[vid].append(f"{verb_maps[str(verb_id)]} {noun_maps[str(noun_id)]}")
    return vid_to_intervals, vid_to_action_representation


def ref_get_pseudo_dict(pseudo_folder):
    import glob

    pseudo_data, ret = {}, {}
    for file in glob.glob(os.path.join(pseudo_folder, "prediction*.json")):
        with open(file) as f:
            pseudo_data.update(json.load(f))
    for v in pseudo_data.values():
        start_timestamp, end_timestamp = round(float(v["start_second"]), 2), round(float(v["end_second"]), 2)
        vid = v["vid_path"].replace("/", "-")
        ret[f"{vid}_{start_timestamp}_{end_timestamp}"] = v["llava_pred"]
    return ret


def ref_get_lookup_dict(ann_file, action_representation, verb_maps, noun_maps, test_type="base", delta=3,
                        pseudo_folder=None):
    vid_to_intervals, vid_to_action_representation = ref_get_annotated_intervals(
        ann_file, action_representation, verb_maps, noun_maps)
    table = {}
    pseudo_dict = ref_get_pseudo_dict(pseudo_folder) if test_type == "temporal_cot_pseudo" else None
    for vid, intervals in vid_to_intervals.items():
        sorted_indices = sorted(range(len(intervals)), key=lambda i: intervals[i][1])
        sorted_intervals = [intervals[i] for i in sorted_indices]
        sorted_narrations = [vid_to_action_representation[vid][i] for i in sorted_indices]
        end_times = [end for _, end in sorted_intervals]
        start_times = [start for start, _ in sorted_intervals]
        for i in range(len(sorted_intervals) - 2):
            id = vid.split("_")[0] + "-" + vid
            if start_times[i + 1] - end_times[i] <= delta and start_times[i + 2] - end_times[i + 1] <= delta:
                uid1 = f"{id}_{round(start_times[i], 2)}_{round(end_times[i], 2)}"
                uid2 = f"{id}_{round(start_times[i + 1], 2)}_{round(end_times[i + 1], 2)}"
                uid3 = f"{id}_{round(start_times[i + 2], 2)}_{round(end_times[i + 2], 2)}"
                if test_type == "temporal_cot_pseudo":
                    narration1, narration2 = pseudo_dict[uid1], pseudo_dict[uid2]
                else:
                    narration1, narration2 = sorted_narrations[i], sorted_narrations[i + 1]
                table[uid3] = {"prev2_narration": narration1,
                               "prev2_offset": round(start_times[i + 2] - start_times[i], 2),
                               "prev1_narration": narration2,
                               "prev1_offset": round(start_times[i + 2] - start_times[i + 1], 2)}
    return table


def ref_format_task_related_prompt(question, question_type, meta_data, perspective, learn_neighbor_actions):
    """The test-time branches (no training coin: temporal_cot_* never draws one)."""
    if perspective == "first_person":
        perspective_prefix = ("You are seeing this video from egocentric view and you are the person. Your hands are "
                              "sometimes interacting with objects. What action are you doing? ")
    else:
        perspective_prefix = ("The video is taken from egocentric view. The person's hands are sometimes interacting "
                              "with objects. What action is the person doing?")
    if question_type.startswith("temporal_cot") and learn_neighbor_actions == "prior" and meta_data:
        m = meta_data
        suffix = (f"{m['prev2_offset']} seconds ago, you started an action {m['prev2_narration']}. "
                  f"{m['prev1_offset']} seconds ago, you started an action {m['prev1_narration']}. What action are "
                  "you currently performing? Here are the options of actions you can select:\n" + ", ".join(question))
        return f"{perspective_prefix}\n" + suffix
    prefix = f"{perspective_prefix}Given multiple choices, format your answer briefly such as 'A. move knife'. \n"
    return prefix + "Here are the options of actions you are selecting:\n" + ", ".join(question)


def ref_format_llava_prompt(question, video_duration, n_frames, question_type, include_time_instruction, meta_data,
                            learn_neighbor_actions, perspective):
    task = ref_format_task_related_prompt(question, question_type, meta_data, perspective, learn_neighbor_actions)
    time_instruction = (f"The provided video lasts for {video_duration:.3f} seconds, and {n_frames} frames are "
                        "uniformly sampled from it.")
    return f"<image>\n{time_instruction}{task}" if include_time_instruction else f"<image>\n{task}"


def ref_prompts(ann_root, options_by_uid, representation, test_type, include_time, n_frames, perspective,
                pseudo_folder=None):
    """ek_eval's loop over the validation CSV: the lookup key of each clip, then the prompt for its options."""
    verb_maps, noun_maps = ref_key_maps(ann_root)
    ann_file = os.path.join(ann_root, "EPIC_100_validation.csv")
    table = ref_get_lookup_dict(ann_file, representation, verb_maps, noun_maps, test_type,
                                pseudo_folder=pseudo_folder)
    reader = csv.reader(open(ann_file))
    next(reader)
    out = {}
    for row in reader:
        vid_path = "{}/{}".format(*row[1:3])
        start_second, end_second = round(ref_datetime2sec(row[4]), 2), round(ref_datetime2sec(row[5]), 2)
        meta_data = table.get(f"{vid_path.replace('/', '-')}_{start_second}_{end_second}", None)
        out[row[0]] = ref_format_llava_prompt(options_by_uid[row[0]], end_second - start_second, n_frames, test_type,
                                              include_time, meta_data, "prior", perspective)
    return out


# ----------------------------------------------------------------------------- side by side
# One video; rows 6 and 7 follow a gap of more than 3 s, row 8 comes an hour later (out of end-time order).
VALIDATION = [
    (0.0, 1.03, "open door", "open", 2, "door", 1), (1.2, 2.0, "close the door", "close", 3, "door", 1),
    (2.5, 3.1, "grab cup", "take", 0, "cup", 2), (3.3, 4.0, "wash hands", "wash", 4, "hands", 4),
    (4.1, 5.5, "open cupboard", "open", 2, "cupboard", 5), (6.0, 7.25, "put down", "put", 1, "pan:frying", 3),
    (10.5, 11.0, "turn on tap", "turn-on", 5, "tap", 0), (11.2, 11.9, "cut onion", "cut", 10, "cup", 2),
    (3725.0, 3726.5, "close cupboard", "close", 3, "cupboard", 5), (12.0, 12.333, "take knife", "take", 0, "knife", 10),
]


@pytest.fixture
def ann(tmp_path):
    return write_fake_annotations(tmp_path / "ann", validation_rows=VALIDATION)


def build(ann, out, *extra):
    return main(["build-mqa", "--annotations", str(ann), "--out", str(out), *extra])


def options_by_uid(questions):
    return {q["uid"]: q["options"] for q in questions}


@pytest.mark.parametrize("representation, perspective, time", [("GT_random_narration", "first_person", True),
                                                               ("official_key", "third_person", False)])
def test_oracle_prompts_equal_upstreams(ann, tmp_path, representation, perspective, time):
    extra = ["--time-instruction"] if time else []
    assert build(ann, tmp_path / "q.jsonl", "--prior-actions", "oracle", "--representation", representation,
                 "--perspective", perspective, "--num-frames", "8", *extra) == 0
    meta, questions = mqa.read_question_file(tmp_path / "q.jsonl")
    expected = ref_prompts(ann, options_by_uid(questions), representation, "temporal_cot_oracle", time, 8, perspective)
    assert {q["uid"]: "<image>\n" + q["prompt"] for q in questions} == expected
    with_prior = [q for q in questions if q["prior_actions"]]
    assert meta["counts"]["with_prior_actions"] == len(with_prior) == 5  # rows 2-5, and 9 after 6-7
    assert meta["settings"]["prior_actions"] == "oracle"
    assert all("seconds ago" in q["prompt"] for q in with_prior)
    # the previous actions recorded in the file are those of the same video, found by narration id
    third = questions[2]["prior_actions"]
    assert (third["prev2_id"], third["prev1_id"]) == ("P91_01_0", "P91_01_1")
    # without prior actions the same options give upstream's plain MC prompt
    plain = ref_prompts(ann, options_by_uid(questions), representation, "base", time, 8, perspective)
    assert build(ann, tmp_path / "plain.jsonl", "--representation", representation, "--perspective", perspective,
                 "--num-frames", "8", *extra) == 0
    assert {q["uid"]: "<image>\n" + q["prompt"] for q in mqa.read_question_file(tmp_path / "plain.jsonl")[1]} == plain


def write_pseudo_sources(ann, tmp_path, questions):
    """What an earlier run answered for every clip, twice: our eval's predictions.jsonl (records as
    runner.prediction_record writes them) and upstream's --pseudo_folder (PredictionAnalysis.save's layout)."""
    answers = {q["uid"]: f"pseudo answer {i}" for i, q in enumerate(questions)}
    lines = [{"index": i, "uid": q["uid"], "options": q["options"],
              "generate": {"raw": "X. " + answers[q["uid"]], "parsed": answers[q["uid"]], "letter": None}}
             for i, q in enumerate(questions)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    folder = tmp_path / "upstream_pseudo"
    folder.mkdir()
    segments = labels.read_annotation_csv(ann / "EPIC_100_validation.csv")
    buffer = {str(i): {"llava_pred": answers[s.narration_id], "gt_name": s.narration, "avion_preds": None,
                       "dataset_name": "EK100", "start_second": round(s.start, 2), "end_second": round(s.end, 2),
                       "vid_path": f"{s.participant_id}/{s.video_id}"} for i, s in enumerate(segments)}
    (folder / "prediction_analysis_buf_rank0.json").write_text(json.dumps(buffer))
    return answers, folder


def test_pseudo_prompts_equal_upstreams_from_either_kind_of_earlier_run(ann, tmp_path):
    assert build(ann, tmp_path / "q.jsonl", "--time-instruction") == 0
    _, questions = mqa.read_question_file(tmp_path / "q.jsonl")
    answers, folder = write_pseudo_sources(ann, tmp_path, questions)
    assert build(ann, tmp_path / "ours.jsonl", "--time-instruction", "--prior-actions", "pseudo",
                 "--pseudo-predictions", str(tmp_path / "predictions.jsonl")) == 0
    assert build(ann, tmp_path / "theirs.jsonl", "--time-instruction", "--prior-actions", "pseudo",
                 "--pseudo-predictions", str(folder)) == 0
    meta, ours = mqa.read_question_file(tmp_path / "ours.jsonl")
    assert ours == mqa.read_question_file(tmp_path / "theirs.jsonl")[1]
    expected = ref_prompts(ann, options_by_uid(ours), "GT_random_narration", "temporal_cot_pseudo", True, 16,
                           "first_person", pseudo_folder=str(folder))
    assert {q["uid"]: "<image>\n" + q["prompt"] for q in ours} == expected
    assert answers["P91_01_0"] in ours[2]["prompt"] and "open door" not in ours[2]["prompt"].split("options")[0]
    assert meta["settings"]["prior_actions"] == "pseudo" and meta["inputs"]["pseudo_predictions"].endswith(".jsonl")
    # the options and everything else are those of the run without prior actions
    assert [{k: v for k, v in q.items() if k not in ("prompt", "prior_actions")} for q in ours] == [
        {k: v for k, v in q.items() if k not in ("prompt", "prior_actions")} for q in questions]


def test_prior_action_errors_name_what_is_missing(ann, tmp_path, capsys):
    assert build(ann, tmp_path / "q.jsonl") == 0
    _, questions = mqa.read_question_file(tmp_path / "q.jsonl")
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"uid": q["uid"], "options": q["options"], "generate": {"parsed": "x"}})
                               + "\n" for q in questions[1:]))
    assert build(ann, tmp_path / "p.jsonl", "--prior-actions", "pseudo", "--pseudo-predictions", str(partial)) == 2
    assert "no prediction for P91_01_0" in capsys.readouterr().err
    assert build(ann, tmp_path / "p.jsonl", "--prior-actions", "pseudo") == 2
    assert "--pseudo-predictions" in capsys.readouterr().err
    assert build(ann, tmp_path / "p.jsonl", "--prior-actions", "oracle", "--representation", "GT_key") == 2
    assert "prior actions need --representation GT_random_narration or official_key" in capsys.readouterr().err
    assert build(ann, tmp_path / "p.jsonl", "--prior-actions", "oracle", "--test-type", "direct_narration") == 2
    assert "mc test type" in capsys.readouterr().err


def test_real_validation_oracle_prompts(ek100_dir, tmp_path):
    extra = () if (ek100_dir / labels.TRAIN_CSV).exists() else ("--label-space", "uda")
    assert build(ek100_dir, tmp_path / "q.jsonl", "--prior-actions", "oracle", "--time-instruction", *extra) == 0
    meta, questions = mqa.read_question_file(tmp_path / "q.jsonl")
    expected = ref_prompts(ek100_dir, options_by_uid(questions), "GT_random_narration", "temporal_cot_oracle", True,
                           16, "first_person")
    assert {q["uid"]: "<image>\n" + q["prompt"] for q in questions} == expected
    assert 0.5 * len(questions) < meta["counts"]["with_prior_actions"] < len(questions)
