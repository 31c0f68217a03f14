"""EK100 training samples: MQA (random / train-time prediction distractors), direct narration, temporal detection,
prior-action prompts, time instruction; on invented rows and on the real CSVs."""

import json
import re

import numpy as np
import pytest
from test_ek100 import FAKE_TRAIN, write_fake_annotations

from llavaction_jax.data import ek100
from llavaction_jax.data.ek100_train import (TrainSampleSettings, prior_action_key, prior_action_table,
                                             training_samples, write_samples_jsonl)

FIRST_PERSON = ("You are seeing this video from egocentric view and you are the person. Your hands are sometimes "
                "interacting with objects. What action are you doing? ")


@pytest.fixture
def data(tmp_path):
    folder = write_fake_annotations(tmp_path / "ann")
    return ek100.load_label_maps(folder), ek100.read_annotation_csv(folder / "EPIC_100_train.csv")


def options_of(human):
    """The lettered options at the end of an MC prompt."""
    return re.split(r", (?=[A-Z]\. )", human.split(" select:\n" if " select:\n" in human else "selecting:\n")[-1])


def test_mc_samples_random_distractors(data):
    maps, segments = data
    samples = training_samples("mc", segments, maps, TrainSampleSettings(seed=1))
    assert len(samples) == len(FAKE_TRAIN) == len({s["id"] for s in samples})
    for sample, row, segment in zip(samples, FAKE_TRAIN, segments):
        human, gpt = (turn["value"] for turn in sample["conversations"])
        assert [turn["from"] for turn in sample["conversations"]] == ["human", "gpt"]
        duration = f"{row[1] - row[0]:.3f}"
        assert human.startswith(f"<image>\nThe provided video lasts for {duration} seconds, and 16 frames are "
                                "uniformly sampled from it." + FIRST_PERSON + "Given multiple choices, format your "
                                "answer briefly such as 'A. move knife'. \nHere are the options of actions you are "
                                "selecting:\n")
        options = options_of(human)
        assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. ", "E. "]
        assert gpt in options and gpt[3:] == row[2] and [o[3:] for o in options].count(row[2]) == 1
        assert sample["question_type"] == "mc_GT_random_narration" and sample["video"] == "P90-P90_01"
        assert (sample["start"], sample["end"]) == (segment.start, segment.end)
        assert (sample["verb_id"], sample["noun_id"], sample["action_id"]) == (row[4], row[6], maps.vn2act[segment.vn])
    assert training_samples("mc", segments, maps, TrainSampleSettings(seed=1)) == samples
    assert training_samples("mc", segments, maps, TrainSampleSettings(seed=2)) != samples


def test_official_key_without_time_instruction(data):
    maps, segments = data
    settings = TrainSampleSettings(representation="official_key", include_time_instruction=False, n_options=3)
    sample = training_samples("mc", segments, maps, settings)[9]  # "take frying pan", 0:3
    human, gpt = (turn["value"] for turn in sample["conversations"])
    assert human.startswith("<image>\n" + FIRST_PERSON + "Given multiple choices")
    assert gpt[3:] == "take frying pan" and len(options_of(human)) == 3
    assert sample["question_type"] == "mc_official_key"


def test_train_time_prediction_distractors(data):
    maps, segments = data
    ranked = {s.row_index: [vn for vn in maps.actions if vn != s.vn][:9] + [s.vn] for s in segments}
    predictions = {i: ek100.ActionPredictions(tuple(r), segments[i].vn) for i, r in ranked.items()}
    samples = training_samples("mc", segments, maps, TrainSampleSettings(), predictions, "tim_train.json")
    deep = 0
    for sample, segment in zip(samples, segments):
        human, gpt = (turn["value"] for turn in sample["conversations"])
        texts = [o[3:] for o in options_of(human)]
        assert len(texts) == 5 and texts.count(segment.narration) == 1 and gpt[3:] == segment.narration
        # every distractor text is a narration (or fallback key) of one of the top-2k actions
        pool = ranked[segment.row_index][:10]
        names = {n for vn in pool if vn != segment.vn for n in maps.vn2narrations.get(vn, [])}
        names |= {maps.key_text(vn) for vn in pool}
        assert all(t in names for t in texts if t != segment.narration), texts
        deep += any(t in {n for vn in pool[4:9] for n in maps.vn2narrations[vn]} for t in texts)
    assert deep > 0  # distractors are drawn from the whole top-2k, not just the top-(k-1)
    short = {i: ek100.ActionPredictions(("0:2", "2:1"), None) for i in ranked}
    with pytest.raises(ek100.AnnotationError, match=r"tim_train.json: entry '0' .*2 predictions, need at least 5"):
        training_samples("mc", segments, maps, TrainSampleSettings(), short, "tim_train.json")
    repeated = {i: ek100.ActionPredictions(("5:0",) * 10, None) for i in ranked}
    with pytest.raises(ek100.AnnotationError, match=r"uid P90_01_0 \(row 0\): 1 distinct non-GT"):
        training_samples("mc", segments, maps, TrainSampleSettings(), repeated, "x.json")


def test_prior_action_table(data):
    maps, segments = data
    table = prior_action_table(segments, maps, "GT_random_narration")
    # rows 2-5 and 8-11 follow two segments ending at most 3 s before their successors; rows 6-7 come after a gap
    assert set(table) == {prior_action_key("P90-P90_01", s.start, s.end) for s in segments[2:6] + segments[8:]}
    assert table["P90-P90_01_3.5_4.2"] == {"prev2_narration": "take cup", "prev2_offset": 3.0,
                                           "prev1_narration": "pick up cup", "prev1_offset": 1.5,
                                           "cur_narration": "open door"}
    assert table["P90-P90_01_23.0_24.0"]["prev2_narration"] == "wash hands"
    keys = prior_action_table(segments, maps, "official_key")
    assert keys["P90-P90_01_3.5_4.2"]["prev1_narration"] == "take cup"  # the key of 0:2


def test_prior_action_prompt_on_30_percent_and_epoch_only_moves_the_coin(data):
    maps, segments = data
    humans = []
    for epoch in range(40):
        sample = training_samples("mc", segments, maps, TrainSampleSettings(prior_actions=True, epoch=epoch))[2]
        humans.append(sample["conversations"][0]["value"])
    with_prior = [h for h in humans if "seconds ago" in h]
    assert 3 <= len(with_prior) <= 22
    assert with_prior[0].startswith(
        "<image>\nThe provided video lasts for 0.700 seconds, and 16 frames are uniformly sampled from it."
        + FIRST_PERSON + "\n3.0 seconds ago, you started an action take cup. 1.5 seconds ago, you started an action "
        "pick up cup. What action are you currently performing? Here are the options of actions you can select:\n")
    assert len({tuple(options_of(h)) for h in humans}) == 1  # same options every epoch
    # segments without prior metadata never get the variant
    no_prior = [training_samples("mc", segments, maps, TrainSampleSettings(prior_actions=True, epoch=e))[6]
                for e in range(20)]
    assert not any("seconds ago" in s["conversations"][0]["value"] for s in no_prior)


def test_direct_narration(data):
    maps, segments = data
    sample = training_samples("direct_narration", segments, maps, TrainSampleSettings(n_frames=64))[0]
    assert sample["conversations"] == [
        {"from": "human", "value": "<image>\nThe provided video lasts for 1.000 seconds, and 64 frames are uniformly "
                                   "sampled from it.You are seeing this video from egocentric view and you are the "
                                   "person. Your hands are sometimes interacting with objects. What action are you "
                                   "doing?  What action are you performing? Give a short sentence such as 'move "
                                   "knife'."},
        {"from": "gpt", "value": "take cup"}]
    assert sample["question_type"] == "direct_narration" and sample["id"] == "P90_01_0-direct_narration"


def test_temporal_detection(data):
    maps, segments = data
    for seed in range(20):
        samples = training_samples("temporal_detection", segments, maps, TrainSampleSettings(seed=seed))
        for sample, segment in zip(samples, segments):
            human, gpt = (turn["value"] for turn in sample["conversations"])
            start, end = sample["start"], sample["end"]
            assert start == round(start, 2) and end == round(end, 2) and 0 <= start <= segment.start
            assert abs((end - start) - (segment.end - segment.start + 5.0)) < 0.011 or start == 0.0
            assert human == (
                f"<image>\nThe provided video lasts for {end - start:.3f} seconds, and 16 frames are uniformly "
                f"sampled from it.The provided video contains an action '{segment.narration}' that lasts "
                f"{round(segment.end - segment.start, 2)} seconds. What is the relative start and end time of the "
                "action in seconds? Format it as 'start_timestamp: end_timestamp' and round to 2 decimal places.")
            assert gpt == f"{round(segment.start - start, 2)}, {round(segment.end - start, 2)}"
    clipped = [training_samples("temporal_detection", segments, maps, TrainSampleSettings(seed=s))[0]
               for s in range(20)]
    assert any(s["start"] == 0.0 and s["conversations"][1]["value"] == "0.5, 1.5" for s in clipped)


def test_write_samples_jsonl(data, tmp_path):
    maps, segments = data
    samples = training_samples("direct_narration", segments, maps, TrainSampleSettings())
    write_samples_jsonl(samples, tmp_path / "out" / "direct.jsonl")
    lines = (tmp_path / "out" / "direct.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples


def test_real_training_samples(ek100_dir):
    train_csv = ek100_dir / ek100.UDA_TRAIN_STAND_INS[0]
    maps = ek100.load_label_maps(ek100_dir, label_space="uda")
    segments = ek100.read_annotation_csv(train_csv)
    settings = TrainSampleSettings(prior_actions=True, n_frames=64)
    table = prior_action_table(segments, maps, settings.representation)
    samples = training_samples("mc", segments, maps, settings, prior_table=table)
    assert len(samples) == 16115
    with_meta = [s for s, seg in zip(samples, segments)
                 if prior_action_key(seg.video, seg.start, seg.end) in table]
    assert len(with_meta) > 5000
    share = np.mean(["seconds ago" in s["conversations"][0]["value"] for s in with_meta])
    assert 0.27 < share < 0.33
    for sample, segment in zip(samples, segments):
        human, gpt = (turn["value"] for turn in sample["conversations"])
        assert human.startswith("<image>\nThe provided video lasts for ") and " 64 frames " in human
        texts = [o[3:] for o in options_of(human)]
        assert len(texts) == 5 and texts.count(segment.narration) == 1 and gpt[3:] == segment.narration
        assert sample["action_id"] == maps.vn2act[segment.vn]
    detection = training_samples("temporal_detection", segments, maps, settings)
    # the window holds the segment (up to the 2-decimal rounding of its bounds, as upstream)
    assert all(s["start"] <= seg.start + 0.005 and seg.end - 0.005 <= s["end"] for s, seg in zip(detection, segments))
