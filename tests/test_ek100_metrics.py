"""The paper's EK100 recognition metrics (action / verb / noun top-1 of the chosen option, the candidates' recall, the
action model's own top-1) worked out by hand on four prediction records, and where they appear: results.json
(compute_metrics), report.md and lmms-eval's per-sample records and aggregates."""

import pytest

from llavaction_jax.eval import lmms_layout, metrics, report
from llavaction_jax.eval.parsing import score_answer


def record(index, options, option_vns, gt_vn, gt_letter, gt_text, raw, score_letter, top1_vn):
    return {"index": index, "uid": f"q{index}", "options": options, "option_vns": option_vns, "gt_vn": gt_vn,
            "gt_letter": gt_letter, "gt_text": gt_text, "groups": {}, "top1_vn": top1_vn, "top1_text": "t",
            "generate": {"raw": raw, **score_answer(raw, options, gt_letter, gt_text)},
            "score": {"letter": score_letter, "correct_letter": score_letter == gt_letter, "correct_text": False,
                      "letter_normalized": score_letter, "correct_letter_normalized": False,
                      "logprob_sum": [-1.0] * len(options)}}


ABC = ["A. open door", "B. take cup", "C. wash plate"]
PREDS = [
    # all right, by every measure
    record(0, ABC, ["1:10", "2:20", "3:40"], "1:10", "A", "open door", "A. open door", "A", "1:10"),
    # generate picks 2:30 for GT 2:20 (verb right, noun wrong); score picks 3:40; the model's top-1 is 2:30
    record(1, ["A. wash plate", "B. take cup", "C. take mug"], ["3:40", "2:20", "2:30"], "2:20", "B", "take cup",
           "C. take mug", "A", "2:30"),
    # recognition: the GT 3:50 is not among the candidates; generate picks 1:50 (noun right), score 3:40 (verb)
    record(2, ["A. wash plate", "B. open drawer", "C. take cup"], ["3:40", "1:50", "2:20"], "3:50", None,
           "wash drawer", "B. open drawer", "A", "3:40"),
    # generate names no option; score picks the GT
    record(3, ["A. take cup", "B. wash plate", "C. open drawer"], ["2:20", "3:40", "1:50"], "1:50", "C",
           "open drawer", "no idea", "C", "2:20"),
]


def test_ek100_metrics_by_hand():
    m = metrics.compute_metrics(PREDS)["ek100"]
    assert m["n"] == 4 and m["candidates_recall"] == 0.75
    assert m["generate"] == {"n": 4, "action_top1": 0.25, "verb_top1": 0.5, "noun_top1": 0.5}
    assert m["score"] == {"n": 4, "action_top1": 0.5, "verb_top1": 0.75, "noun_top1": 0.5}
    # top-1 of the action model: 1:10 right; 2:30 (verb); 3:40 for 3:50 (verb); 2:20 for 1:50 (nothing)
    assert m["action_model"] == {"n": 4, "action_top1": 0.25, "verb_top1": 0.75, "noun_top1": 0.25}
    assert "ek100" not in metrics.compute_metrics([{k: v for k, v in p.items() if k != "option_vns"} for p in PREDS])


def test_report_and_lmms_records_carry_them(tmp_path):
    results = {"questions": "q.jsonl", "format": "ek100", "num_questions": 4, "num_without_gt": 1,
               "model": {"name": "m"}, "run": {"process_count": 1, "mesh": {}, "questions_per_second": 1.0,
                                               "wall_s": 1.0}, **metrics.compute_metrics(PREDS)}
    text = report.write_report(results, tmp_path).read_text()
    assert "## EK100 action recognition" in text
    assert "Candidates' recall (the GT among the options): 75.00% of 4" in text
    assert "| generate (chosen option) | 4 | 25.00% | 50.00% | 50.00% |" in text
    assert "| score (chosen option) | 4 | 50.00% | 75.00% | 50.00% |" in text
    assert "| action model's top-1 | 4 | 25.00% | 75.00% | 25.00% |" in text
    content, samples = lmms_layout.build(PREDS, ["<image>\nx"] * 4, fmt="ek100", modes=("generate", "score"),
                                         questions_path="q.jsonl", total_questions=4, model_name="m", batch_size=1,
                                         limit=None, gen_kwargs={}, device="cpu", wall_s=1.0, date=0.0)
    generate = content["results"]["ek100_mqa"]
    assert generate["action_top1,none"] == 0.25 and generate["verb_top1,none"] == 0.5
    assert generate["candidates_recall,none"] == 0.75 and generate["action_model_top1,none"] == 0.25
    assert content["results"]["ek100_mqa_score"]["verb_top1,none"] == 0.75
    assert generate["action_top1_stderr,none"] == pytest.approx(0.25)  # sample std 0.5 / sqrt(4)
    assert [s["noun_top1"] for s in samples["ek100_mqa"]] == [1.0, 0.0, 1.0, 0.0]
    assert {m["metric"] for m in content["configs"]["ek100_mqa"]["metric_list"]} >= {"action_top1", "noun_top1"}
