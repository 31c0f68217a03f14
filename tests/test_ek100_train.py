"""EK100 training samples in upstream's released layout: MC (random / AVION / TIM train-time distractors), direct
narration, temporal detection, the prior-action table; per-(sample, question type, source) RNGs; on invented rows
and on the real CSVs."""

import ast
import dataclasses
import json

import numpy as np
import pytest
from test_ek100 import FAKE_TRAIN, write_fake_annotations

from llavaction_jax.ek100 import labels
from llavaction_jax.ek100.prior_actions import prior_action_key, prior_action_table
from llavaction_jax.ek100.train_files import TrainSampleSettings, training_samples, write_samples_jsonl

# The keys upstream's generators write, in their order (generate_description.py: generate_train_ann), + ours last.
UPSTREAM_KEYS = ["video", "conversations", "id", "split", "task_instruction", "num_samples", "question_type",
                 "dataset_name", "start_timestamp", "end_timestamp", "verb_id", "noun_id", "action_id"]


@pytest.fixture
def data(tmp_path):
    folder = write_fake_annotations(tmp_path / "ann")
    return labels.load_label_maps(folder), labels.read_annotation_csv(folder / "EPIC_100_train.csv")


def hard_predictions(maps, segments):
    """Ranked lists with the GT at rank 10 (so the top-2k holds 9 distractors)."""
    ranked = {s.row_index: [vn for vn in maps.actions if vn != s.vn][:9] + [s.vn] for s in segments}
    return ranked, {i: labels.ActionPredictions(tuple(r), segments[i].vn) for i, r in ranked.items()}


def test_mc_samples_have_upstreams_layout(data):
    maps, segments = data
    samples = training_samples("mc", segments, maps, TrainSampleSettings(seed=1))
    assert len(samples) == len(FAKE_TRAIN)
    for sample, row, segment in zip(samples, FAKE_TRAIN, segments):
        assert list(sample) == UPSTREAM_KEYS + ["narration_id"]
        human, gpt = (turn["value"] for turn in sample["conversations"])
        assert [turn["from"] for turn in sample["conversations"]] == ["human", "gpt"]
        options = ast.literal_eval(human)  # upstream's f"{options}": the Python repr of the list
        assert human == str(options) and [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. ", "E. "]
        assert gpt in options and gpt[3:] == row[2] and [o[3:] for o in options].count(row[2]) == 1
        assert sample["video"] == sample["id"] == "P90-P90_01" and sample["narration_id"] == segment.narration_id
        assert (sample["split"], sample["task_instruction"], sample["num_samples"]) == ("train", "", 1)
        assert sample["question_type"] == "mc_GT_random_narration" and sample["dataset_name"] == "EK100"
        assert (sample["start_timestamp"], sample["end_timestamp"]) == (segment.start, segment.end)
        assert (sample["verb_id"], sample["noun_id"], sample["action_id"]) == (row[4], row[6], maps.vn2act[segment.vn])
    assert training_samples("mc", segments, maps, TrainSampleSettings(seed=1)) == samples
    assert training_samples("mc", segments, maps, TrainSampleSettings(seed=2)) != samples


def test_official_key(data):
    maps, segments = data
    sample = training_samples("mc", segments, maps, TrainSampleSettings(representation="official_key", n_options=3))[9]
    options = ast.literal_eval(sample["conversations"][0]["value"])  # "take frying pan", 0:3
    assert len(options) == 3 and sample["conversations"][1]["value"][3:] == "take frying pan"
    assert sample["question_type"] == "mc_official_key"


def test_train_time_prediction_distractors(data):
    maps, segments = data
    ranked, predictions = hard_predictions(maps, segments)
    samples = training_samples("mc", segments, maps, TrainSampleSettings(), predictions, "tim_train.json", "tim")
    deep = 0
    for sample, segment in zip(samples, segments):
        texts = [o[3:] for o in ast.literal_eval(sample["conversations"][0]["value"])]
        assert len(texts) == 5 and texts.count(segment.narration) == 1
        assert sample["conversations"][1]["value"][3:] == segment.narration
        pool = ranked[segment.row_index][:10]  # every distractor renders one of the top-2k actions
        names = {n for vn in pool if vn != segment.vn for n in maps.vn2narrations.get(vn, [])}
        names |= {maps.key_text(vn) for vn in pool}
        assert all(t in names for t in texts if t != segment.narration), texts
        deep += any(t in {n for vn in pool[4:9] for n in maps.vn2narrations[vn]} for t in texts)
    assert deep > 0  # distractors come from the whole top-2k, not just the top-(k-1)
    short = {i: labels.ActionPredictions(("0:2", "2:1"), None) for i in ranked}
    with pytest.raises(labels.AnnotationError, match=r"tim_train.json: entry '0' .*2 predictions, need at least 5"):
        training_samples("mc", segments, maps, TrainSampleSettings(), short, "tim_train.json", "tim")
    repeated = {i: labels.ActionPredictions(("5:0",) * 10, None) for i in ranked}
    with pytest.raises(labels.AnnotationError, match=r"uid P90_01_0 \(row 0\): 1 distinct non-GT"):
        training_samples("mc", segments, maps, TrainSampleSettings(), repeated, "x.json", "avion")
    with pytest.raises(ValueError, match="MC source 'random' with predictions"):
        training_samples("mc", segments, maps, TrainSampleSettings(), predictions, "x.json", "random")


def test_avion_and_tim_copies_draw_independently(data):
    """The same predictions in both files: only the source separates the draws. A shared stream would give the
    same GT letter every time; independent draws agree 1 time in 5."""
    maps, segments = data
    many = [dataclasses.replace(segments[i % len(segments)], narration_id=f"X_{i}", row_index=i) for i in range(1500)]
    _, predictions = hard_predictions(maps, many)
    letters = {}
    for source in ("avion", "tim"):
        samples = training_samples("mc", many, maps, TrainSampleSettings(), predictions, f"{source}.json", source)
        letters[source] = np.array([s["conversations"][1]["value"][0] for s in samples])
    agreement = np.mean(letters["avion"] == letters["tim"])
    assert 0.16 < agreement < 0.24, agreement  # 1500 draws: 0.2 +- 0.01 (1 sigma)
    assert {str(x) for x in letters["avion"]} == set("ABCDE")


def test_prior_action_table(data):
    maps, segments = data
    table = prior_action_table(segments, maps, "GT_random_narration")
    # rows 2-5 and 8-11 follow two segments ending at most 3 s before their successors; rows 6-7 come after a gap
    assert set(table) == {prior_action_key("P90-P90_01", s.start, s.end) for s in segments[2:6] + segments[8:]}
    assert table["P90-P90_01_3.5_4.2"] == {"prev2_narration": "take cup", "prev2_offset": 3.0,
                                           "prev1_narration": "pick up cup", "prev1_offset": 1.5,
                                           "cur_narration": "open door", "prev2_id": "P90_01_0",
                                           "prev1_id": "P90_01_1", "prev2_key": "P90-P90_01_0.5_1.5",
                                           "prev1_key": "P90-P90_01_2.0_3.0"}
    assert table["P90-P90_01_23.0_24.0"]["prev2_narration"] == "wash hands"
    keys = prior_action_table(segments, maps, "official_key")
    assert keys["P90-P90_01_3.5_4.2"]["prev1_narration"] == "take cup"  # the key of 0:2


def test_direct_narration(data):
    maps, segments = data
    sample = training_samples("direct_narration", segments, maps, TrainSampleSettings())[0]
    assert sample["conversations"] == [{"from": "human", "value": ""}, {"from": "gpt", "value": "take cup"}]
    assert sample["question_type"] == "direct_narration" and list(sample) == UPSTREAM_KEYS + ["narration_id"]


def test_temporal_detection(data):
    maps, segments = data
    for seed in range(20):
        samples = training_samples("temporal_detection", segments, maps, TrainSampleSettings(seed=seed))
        for sample, segment in zip(samples, segments):
            human, gpt = (turn["value"] for turn in sample["conversations"])
            start_text, end_text = sample["start_timestamp"], sample["end_timestamp"]
            assert isinstance(start_text, str) and isinstance(end_text, str)  # upstream stores str(round(x, 2))
            start, end = float(start_text), float(end_text)
            assert start_text == str(round(start, 2)) and 0 <= start <= segment.start
            assert abs((end - start) - (segment.end - segment.start + 5.0)) < 0.011 or start == 0.0
            assert human == (
                f"The provided video contains an action '{segment.narration}' that lasts "
                f"{round(segment.end - segment.start, 2)} seconds. What is the relative start and end time of the "
                "action in seconds? Format it as 'start_timestamp: end_timestamp' and round to 2 decimal places.")
            assert gpt == f"{round(segment.start - start, 2)}, {round(segment.end - start, 2)}"
    clipped = [training_samples("temporal_detection", segments, maps, TrainSampleSettings(seed=s))[0]
               for s in range(20)]
    assert any(s["start_timestamp"] == "0.0" and s["conversations"][1]["value"] == "0.5, 1.5" for s in clipped)


def test_write_samples_jsonl(data, tmp_path):
    maps, segments = data
    samples = training_samples("direct_narration", segments, maps, TrainSampleSettings())
    write_samples_jsonl(samples, tmp_path / "out" / "direct.jsonl")
    lines = (tmp_path / "out" / "direct.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples


def test_real_training_samples(ek100_dir):
    train_csv = ek100_dir / labels.UDA_TRAIN_STAND_INS[0]
    maps = labels.load_label_maps(ek100_dir, label_space="uda")
    segments = labels.read_annotation_csv(train_csv)
    samples = training_samples("mc", segments, maps, TrainSampleSettings())
    assert len(samples) == 16115
    for sample, segment in zip(samples, segments):
        texts = [o[3:] for o in ast.literal_eval(sample["conversations"][0]["value"])]
        assert len(texts) == 5 and texts.count(segment.narration) == 1
        assert sample["conversations"][1]["value"][3:] == segment.narration
        assert sample["action_id"] == maps.vn2act[segment.vn]
    detection = training_samples("temporal_detection", segments, maps, TrainSampleSettings())
    # the window holds the segment (up to the 2-decimal rounding of its bounds, as upstream)
    assert all(float(s["start_timestamp"]) <= seg.start + 0.005 and seg.end - 0.005 <= float(s["end_timestamp"])
               for s, seg in zip(detection, segments))
