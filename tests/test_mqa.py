"""``build-mqa``: determinism, slicing, option counts, GT insertion, errors, and the real validation CSV."""

import json
import pathlib
import shutil

import pytest
from _cli_e2e import run_cli
from test_ek100 import FAKE_VALIDATION, write_fake_annotations

from llavaction_jax.cli import main
from llavaction_jax.ek100 import labels, mqa
from llavaction_jax.eval.questions import load_questions, question_label_space


@pytest.fixture
def fake_dir(tmp_path):
    return write_fake_annotations(tmp_path / "ann")


def build(ann, out, *extra):
    return run_cli(["build-mqa", "--annotations", str(ann), "--out", str(out), *extra])


def read(path):
    return mqa.read_question_file(path)


def gt_count(question):
    return sum(option.split(". ", 1)[1] == question["gt_text"] for option in question["options"])


def write_predictions(path, segments, top):
    """A prediction file: ``top(i, segment)`` gives the ranked list of row i; target is the row's pair."""
    path.write_text(json.dumps({str(s.row_index): {"predictions": top(i, s), "target": s.vn}
                                for i, s in enumerate(segments)}))
    return path


@pytest.mark.cli_e2e("build-mqa")
def test_same_file_twice_and_same_questions_from_two_slices(fake_dir, tmp_path, capsys):
    assert build(fake_dir, tmp_path / "a.jsonl", "--seed", "7") == 0
    assert build(fake_dir, tmp_path / "b.jsonl", "--seed", "7") == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert build(fake_dir, tmp_path / "p0.jsonl", "--seed", "7", "--num-processes", "2", "--process-id", "0") == 0
    assert build(fake_dir, tmp_path / "p1.jsonl", "--seed", "7", "--num-processes", "2", "--process-id", "1") == 0
    merged = (tmp_path / "p0.jsonl").read_bytes() + (tmp_path / "p1.jsonl").read_bytes()
    assert merged == (tmp_path / "a.jsonl").read_bytes()
    meta, questions = read(tmp_path / "p1.jsonl")
    assert meta["slice"] == {"process_index": 1, "num_processes": 2, "rows": [5, 10], "total_rows": 10}
    assert meta["settings"]["seed"] == 7 and len(questions) == 5
    err = capsys.readouterr().err
    assert "[build-mqa] 10/10 questions" in err and "[build-mqa] 5/5 questions" in err
    assert "[build-mqa] 1/10 questions" in err and "ETA " in err  # progress with an ETA from the first question
    # another seed gives another instance
    assert build(fake_dir, tmp_path / "c.jsonl", "--seed", "8") == 0
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()


def test_a_question_depends_only_on_seed_and_uid(fake_dir):
    maps = labels.load_label_maps(fake_dir)
    segments = labels.read_annotation_csv(fake_dir / "EPIC_100_validation.csv")
    settings = mqa.MQASettings(seed=3)
    forward = list(mqa.build_questions(segments, maps, settings))
    backward = list(mqa.build_questions(segments[::-1], maps, settings))[::-1]
    assert forward == backward
    assert mqa.build_question(segments[4], maps, settings) == forward[4]


@pytest.mark.parametrize("k", [2, 5, 7])
def test_option_counts_and_gt_exactly_once(fake_dir, tmp_path, k):
    assert build(fake_dir, tmp_path / "q.jsonl", "--n-options", str(k)) == 0
    meta, questions = read(tmp_path / "q.jsonl")
    assert meta["counts"] == {"questions": 10, "with_gt": 10, "with_prior_actions": 0, "options_outside_label_maps": 0}
    for q, row in zip(questions, FAKE_VALIDATION):
        assert [o[:3] for o in q["options"]] == [f"{chr(65 + i)}. " for i in range(k)]
        assert len(set(q["option_vns"])) == k and q["option_vns"].count(q["gt_vn"]) == 1
        assert len({o[3:] for o in q["options"]}) == k  # no text twice
        assert q["gt_text"] == row[2] and gt_count(q) == 1
        assert q["options"][ord(q["gt_letter"]) - 65] == f"{q['gt_letter']}. {row[2]}"
        assert q["source"] == "random" and q["top1_vn"] is None


def test_question_record_and_prompt(fake_dir, tmp_path):
    assert build(fake_dir, tmp_path / "q.jsonl", "--time-instruction", "--num-frames", "16") == 0
    q = read(tmp_path / "q.jsonl")[1][0]
    assert (q["uid"], q["row_index"], q["video"], q["start"], q["end"]) == ("P91_01_0", 0, "P91-P91_01", 0.0, 1.03)
    assert (q["verb_id"], q["noun_id"], q["gt_vn"], q["narration"]) == (2, 1, "2:1", "open door")
    assert q["action_id"] == labels.load_label_maps(fake_dir).vn2act["2:1"]
    assert q["prompt"] == (
        "The provided video lasts for 1.030 seconds, and 16 frames are uniformly sampled from it.You are seeing this "
        "video from egocentric view and you are the person. Your hands are sometimes interacting with objects. What "
        "action are you doing? Given multiple choices, format your answer briefly such as 'A. move knife'. \nHere are "
        "the options of actions you are selecting:\n" + ", ".join(q["options"]))
    assert build(fake_dir, tmp_path / "t.jsonl", "--perspective", "third_person", "--representation",
                 "official_key") == 0
    q = read(tmp_path / "t.jsonl")[1][0]
    assert q["prompt"].startswith("The video is taken from egocentric view. The person's hands are sometimes "
                                  "interacting with objects. What action is the person doing?Given multiple choices")
    assert q["gt_text"] == "open door"  # official key of 2:1
    keys = {"open door", "close door", "take cup", "put cup", "put knife", "wash hands", "turn-on tap", "cut knife",
            "take frying pan", "open cupboard", "close cupboard", "put frying pan", "cut cup", "take knife"}
    assert all(o[3:] in keys for o in q["options"])


def test_gt_insertion_with_a_prediction_file(fake_dir, tmp_path):
    segments = labels.read_annotation_csv(fake_dir / "EPIC_100_validation.csv")
    actions = labels.load_label_maps(fake_dir).actions
    # even rows: the GT is ranked 3rd; odd rows: the GT is missing from the top 7
    others = lambda s: [vn for vn in actions if vn != s.vn]  # noqa: E731
    top = lambda i, s: others(s)[:2] + [s.vn] + others(s)[2:6] if i % 2 == 0 else others(s)[:7]  # noqa: E731
    preds = write_predictions(tmp_path / "tim_pred_ids_val.json", segments, top)
    assert build(fake_dir, tmp_path / "q.jsonl", "--distractors", "tim", "--predictions", str(preds)) == 0
    _, questions = read(tmp_path / "q.jsonl")
    for i, (q, s) in enumerate(zip(questions, segments)):
        ranked = top(i, s)
        expected = ranked[:5] if i % 2 == 0 else ranked[:4] + [s.vn]  # the GT replaces the 5th prediction
        assert sorted(q["option_vns"]) == sorted(expected)
        assert q["top1_vn"] == ranked[0] and q["source"] == "tim" and gt_count(q) == 1
        assert q["options"][q["option_vns"].index(ranked[0])][3:] == q["top1_text"]
    # benchmark_testing off: the top-k as is, so odd rows have no correct option
    assert build(fake_dir, tmp_path / "n.jsonl", "--distractors", "tim", "--predictions", str(preds),
                 "--no-benchmark-testing") == 0
    meta, questions = read(tmp_path / "n.jsonl")
    assert meta["counts"]["with_gt"] == 5
    for i, (q, s) in enumerate(zip(questions, segments)):
        assert sorted(q["option_vns"]) == sorted(top(i, s)[:5])
        assert (q["gt_letter"] is None) == (i % 2 == 1) and gt_count(q) == (i % 2 == 0)


def test_bad_inputs_give_one_clear_error(fake_dir, tmp_path, capsys):
    segments = labels.read_annotation_csv(fake_dir / "EPIC_100_validation.csv")
    preds = write_predictions(tmp_path / "p.json", segments[:4], lambda i, s: ["0:2", "2:1", "3:1", "4:4", "5:0"])
    assert build(fake_dir, tmp_path / "q.jsonl", "--distractors", "avion", "--predictions", str(preds)) == 2
    assert "p.json: entry '4' (uid P91_01_4" in capsys.readouterr().err
    short = write_predictions(tmp_path / "s.json", segments, lambda i, s: [s.vn, "0:2"])
    assert build(fake_dir, tmp_path / "q.jsonl", "--distractors", "avion", "--predictions", str(short)) == 2
    assert "s.json: entry '0' (uid P91_01_0" in capsys.readouterr().err
    assert build(fake_dir, tmp_path / "q.jsonl", "--distractors", "avion") == 2
    assert "needs --predictions" in capsys.readouterr().err
    assert not (tmp_path / "q.jsonl").exists()  # nothing half-written
    (fake_dir / "EPIC_100_validation.csv").write_text("narration_id,video_id\nx,y\n")
    assert build(fake_dir, tmp_path / "q.jsonl") == 2
    assert "EPIC_100_validation.csv: missing column(s)" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build-mqa", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--annotations", "--out", "--validation-csv", "--train-csv", "--distractors", "--predictions",
                 "--n-options", "--benchmark-testing", "--representation", "--perspective", "--time-instruction",
                 "--num-frames", "--seed", "--distinct-options", "--num-processes", "--process-id"]:
        assert flag in text
    assert "GT_random_narration" in text and "(default: 42)" in text


def test_build_mqa_refuses_without_train_csv_unless_label_space_uda(fake_dir, tmp_path, capsys):
    (fake_dir / "EPIC_100_train.csv").rename(fake_dir / "elsewhere.csv")
    assert build(fake_dir, tmp_path / "q.jsonl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "EPIC_100_train.csv not found" in err[0] and "--label-space uda" in err[0]
    assert not (tmp_path / "q.jsonl").exists()
    (fake_dir / "UDA_annotations").mkdir()
    for name in labels.UDA_TRAIN_STAND_INS:
        shutil.copy(fake_dir / "elsewhere.csv", fake_dir / name)
    assert build(fake_dir, tmp_path / "q.jsonl", "--label-space", "uda") == 0
    meta, _ = read(tmp_path / "q.jsonl")
    assert meta["label_space"]["name"] == "uda"
    assert [pathlib.Path(p).name for p in meta["inputs"]["train_csvs"]] == [
        pathlib.PurePath(n).name for n in labels.UDA_TRAIN_STAND_INS]
    # eval: the same rule for the question file
    with pytest.raises(ValueError, match="UDA label space.*--label-space uda"):
        load_questions(tmp_path / "q.jsonl")
    assert len(load_questions(tmp_path / "q.jsonl", label_space="uda")[2]) == len(FAKE_VALIDATION)
    del meta["label_space"]["name"]  # files written before the name was recorded: told by their train CSVs
    assert question_label_space(meta) == "uda"
    (fake_dir / "elsewhere.csv").rename(fake_dir / "EPIC_100_train.csv")
    assert build(fake_dir, tmp_path / "q2.jsonl") == 0
    assert load_questions(tmp_path / "q2.jsonl")[0] == "ek100"


def test_real_validation_questions(ek100_dir, tmp_path, capsys):
    out = tmp_path / "ek100_mqa.jsonl"
    extra = () if (ek100_dir / labels.TRAIN_CSV).exists() else ("--label-space", "uda")
    assert build(ek100_dir, out, *extra) == 0
    meta, questions = read(out)
    assert len(questions) == 9668 and meta["counts"]["with_gt"] == 9668
    assert len({q["uid"] for q in questions}) == 9668
    assert [q["row_index"] for q in questions] == list(range(9668))
    for q in questions:
        assert len(q["options"]) == 5 and q["source"] == "random"
        assert q["option_vns"].count(q["gt_vn"]) == 1 and gt_count(q) == 1
        assert q["options"][ord(q["gt_letter"]) - 65][3:] == q["gt_text"] == q["narration"]
    # the GT letter is spread evenly over A-E (a shuffling bug would pile it on one letter)
    letters = [q["gt_letter"] for q in questions]
    assert all(1700 < letters.count(letter) < 2170 for letter in "ABCDE")
