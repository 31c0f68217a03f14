"""``build-mqa`` protocols (mqa / recognition), test types (direct_narration, caption_then_answer) and the option
texts GT_key / topk_narration_cut_key, against a reference written here from upstream's code (upstream @bd9f465:
llavaction/action/utils.py: generate_label_map (labels), parse_vn_ids, AvionMultiChoiceGenerator.test_generate,
format_task_related_prompt; llavaction/action/llava_inference.py: the caption_then_answer passes)."""

import csv
import os
from collections import Counter

import pytest
from test_ek100 import write_fake_annotations
from test_mqa import write_predictions
from test_prior_actions import ref_key_maps

from llavaction_jax.cli import main
from llavaction_jax.ek100 import labels, mqa

FIRST = ("You are seeing this video from egocentric view and you are the person. Your hands are sometimes "
         "interacting with objects. What action are you doing? ")


def ref_labels(anno_root):
    """generate_label_map's ``labels``: per v:n, the unique narrations of train then validation rows, most frequent
    first (Counter.most_common)."""
    narrations = {}
    for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv"):
        reader = csv.reader(open(os.path.join(anno_root, name)))
        next(reader)
        for row in reader:
            narrations.setdefault("{}:{}".format(int(row[10]), int(row[12])), []).append(row[8])
    return {vn: [item for item, _ in Counter(items).most_common()] for vn, items in narrations.items()}


def ref_parse_vn_ids(answer_id, gt_vn, narration, action_representation, n_narrations, labels_, verb_maps, noun_maps):
    answer_items = []
    if "key" in action_representation:
        v_id, n_id = answer_id.split(":")
        answer_items.append(f"{verb_maps[v_id]} {noun_maps[n_id]}")
    if "topk_narration" in action_representation:
        assert n_narrations > 0
        answer_items.extend(["example usages could be"] + labels_[answer_id][:n_narrations])
    if "GT" in action_representation and answer_id == gt_vn:
        answer_items = [narration]
    return ", ".join(answer_items)


@pytest.fixture
def ann(tmp_path):
    return write_fake_annotations(tmp_path / "ann")


def build(ann, out, *extra):
    return main(["build-mqa", "--annotations", str(ann), "--out", str(out), *extra])


def ranked_predictions(ann, path, gt_rank, pool=None):
    """Up to 20 distinct predictions per row (default: any v:n of the class CSVs), the GT at ``gt_rank(i)`` (None:
    absent)."""
    if pool is None:
        verbs, nouns = labels.read_class_keys(ann / labels.VERB_CLASSES_CSV, False), labels.read_class_keys(
            ann / labels.NOUN_CLASSES_CSV, True)
        pool = [f"{v}:{n}" for v in sorted(verbs) for n in sorted(nouns)]
    segments = labels.read_annotation_csv(ann / labels.VALIDATION_CSV)

    def top(i, s):
        others = [vn for vn in pool if vn != s.vn][i:i + 20]
        rank = gt_rank(i)
        return others if rank is None else others[:rank] + [s.vn] + others[rank:19]
    return write_predictions(path, segments, top), segments, top


def test_protocols_name_upstreams_two_uses_of_the_action_model(ann, tmp_path, capsys):
    preds, segments, top = ranked_predictions(ann, tmp_path / "tim.json", lambda i: None if i % 3 == 0 else i)
    # recognition: the top-20 as ranked, GT never inserted (upstream's test_generate without benchmark_testing)
    assert build(ann, tmp_path / "r.jsonl", "--protocol", "recognition", "--distractors", "tim", "--predictions",
                 str(preds), "--representation", "official_key") == 0
    meta, questions = mqa.read_question_file(tmp_path / "r.jsonl")
    assert meta["settings"]["protocol"] == "recognition" and meta["settings"]["n_options"] == 20
    assert meta["settings"]["benchmark_testing"] is False
    for i, (q, s) in enumerate(zip(questions, segments)):
        assert sorted(q["option_vns"]) == sorted(top(i, s)) and len(q["options"]) == 20
        assert (q["gt_letter"] is None) == (i % 3 == 0 or i >= 19)  # rank i >= 19 falls out of the top 20
    assert meta["counts"]["with_gt"] == sum(q["gt_letter"] is not None for q in questions) == 6
    # mqa: 5 options, the GT in place of the 5th when the top-5 misses it
    assert build(ann, tmp_path / "m.jsonl", "--protocol", "mqa", "--distractors", "tim", "--predictions",
                 str(preds)) == 0
    meta, questions = mqa.read_question_file(tmp_path / "m.jsonl")
    assert meta["settings"]["protocol"] == "mqa" and meta["counts"]["with_gt"] == 10
    for i, (q, s) in enumerate(zip(questions, segments)):
        expected = top(i, s)[:5] if s.vn in top(i, s)[:5] else top(i, s)[:4] + [s.vn]
        assert sorted(q["option_vns"]) == sorted(expected) and len(q["options"]) == 5
    # contradictions are refused in one line
    assert build(ann, tmp_path / "x.jsonl", "--protocol", "recognition") == 2
    assert "--distractors avion|tim" in capsys.readouterr().err
    assert build(ann, tmp_path / "x.jsonl", "--protocol", "recognition", "--distractors", "tim", "--predictions",
                 str(preds), "--benchmark-testing") == 2
    assert "never inserts the GT" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("representation, n", [("GT_key", -1), ("topk_narration_cut_key", 2)])
def test_key_option_texts_are_upstreams(ann, tmp_path, representation, n):
    # actions with narrations only: upstream's labels[vn] has no entry for the others
    preds, segments, _ = ranked_predictions(ann, tmp_path / "avion.json", lambda i: i % 5,
                                            labels.load_label_maps(ann).actions)
    assert build(ann, tmp_path / "q.jsonl", "--distractors", "avion", "--predictions", str(preds),
                 "--representation", representation, "--n-narrations", str(n)) == 0
    _, questions = mqa.read_question_file(tmp_path / "q.jsonl")
    verb_maps, noun_maps = ref_key_maps(ann)
    ranked = ref_labels(ann)
    for q, s in zip(questions, segments):
        texts = [ref_parse_vn_ids(vn, s.vn, s.narration, representation, n, ranked, verb_maps, noun_maps)
                 for vn in q["option_vns"]]
        assert [o.split(". ", 1)[1] for o in q["options"]] == texts
        assert q["gt_text"] == ref_parse_vn_ids(s.vn, s.vn, s.narration, representation, n, ranked, verb_maps,
                                                 noun_maps)
    assert any("example usages could be" in q["gt_text"] for q in questions) == (representation != "GT_key")


def test_direct_narration_and_caption_then_answer_prompts(ann, tmp_path):
    assert build(ann, tmp_path / "d.jsonl", "--test-type", "direct_narration", "--time-instruction",
                 "--num-frames", "8") == 0
    meta, questions = mqa.read_question_file(tmp_path / "d.jsonl")
    assert meta["settings"]["test_type"] == "direct_narration"
    for q in questions:  # format_llava_prompt with question_type "direct_narration"
        assert q["prompt"] == (f"The provided video lasts for {q['end'] - q['start']:.3f} seconds, and 8 frames are "
                               f"uniformly sampled from it.{FIRST} What action are you performing? Give a short "
                               "sentence such as 'move knife'.")
        assert q["test_type"] == "direct_narration" and q["gt_text"] == q["narration"]
    assert build(ann, tmp_path / "c.jsonl", "--test-type", "caption_then_answer", "--perspective", "third_person",
                 "--time-instruction") == 0
    _, captions = mqa.read_question_file(tmp_path / "c.jsonl")
    assert build(ann, tmp_path / "m.jsonl", "--perspective", "third_person", "--time-instruction") == 0
    _, plain = mqa.read_question_file(tmp_path / "m.jsonl")
    for c, p in zip(captions, plain):
        # the first pass: llava_inference(test_type='caption') with its defaults: first person, no time instruction
        assert c["caption_prompt"] == (f"{FIRST} Describe in details what you see from the video frames. You must "
                                       "talk in the first person perspective. Try to focus on what you are doing. ")
        assert c["prompt"] == p["prompt"]  # the second pass asks the plain MC question of the same options


def test_help_shows_protocols_test_types_and_prior_actions(capsys):
    with pytest.raises(SystemExit):
        main(["build-mqa", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--protocol {mqa,recognition}", "--prior-actions {none,oracle,pseudo}",
                  "--test-type {mc,direct_narration,caption_then_answer}", "--pseudo-predictions", "--n-narrations",
                  "GT_key", "topk_narration_cut_key", "temporal_cot_oracle", "temporal_cot_pseudo"):
        assert words in text, words
