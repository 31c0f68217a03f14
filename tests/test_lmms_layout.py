"""eval's lmms-eval layout (eval/lmms_layout.py): the fields lmms-eval's evaluator and EvaluationTracker write, on
hand-made prediction records whose expected numbers are worked out here by hand."""

import hashlib
import json
import math

from llavaction_jax.eval import lmms_layout

OPTIONS = ["A. open door", "B. close door", "C. take cup"]


def pred(index, raw, parsed, gen_text_ok, gen_letter_ok, sums, score_letter_ok, score_text_ok, norm_ok):
    return {"index": index, "uid": f"P01_{index}", "clip_uid": f"P01_{index}", "options": OPTIONS, "gt_letter": "A",
            "gt_text": "open door", "groups": {"verb": 1}, "prompt_tokens": 40,
            "generate": {"raw": raw, "parsed": parsed, "letter": "A", "correct_text": gen_text_ok,
                         "correct_letter": gen_letter_ok, "num_tokens": 3},
            "score": {"letter": "A", "correct_letter": score_letter_ok, "correct_text": score_text_ok,
                      "letter_normalized": "A", "correct_letter_normalized": norm_ok, "logprob_sum": sums,
                      "logprob_mean": [s / 2 for s in sums], "num_tokens": [2, 2, 2]}}


PREDS = [pred(0, "A. open door", "open door", True, True, [-1.0, -2.0, -3.0], True, True, True),
         pred(1, "B", "close door", False, False, [-2.5, -0.5, -3.0], False, False, True),
         pred(2, "A", "open door", True, True, [-0.1, -2.0, -3.0], True, True, False),
         pred(3, "take cup", "take cup", False, False, [-4.0, -2.0, -1.0], False, False, False)]


def build():
    return lmms_layout.build(PREDS, [f"<image>\nq{i}" for i in range(4)], fmt="ek100", modes=("generate", "score"),
                             questions_path="q.jsonl", total_questions=10, model_name="ckpt/llavaction-7b",
                             batch_size=8, limit=4, gen_kwargs={"max_new_tokens": 32}, device="cpu", wall_s=12.5,
                             date=1795824000.0)


def test_results_json_has_lmms_evals_fields_and_metrics():
    content, _ = build()
    assert {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "date", "task_hashes", "model_name", "model_name_sanitized",
            "total_evaluation_time_seconds"} <= set(content)
    assert set(content["results"]) == {"ek100_mqa", "ek100_mqa_score"}
    gen = content["results"]["ek100_mqa"]
    # 2 of 4 right: mean 0.5; sample std sqrt(4 * 0.25 / 3) = sqrt(1/3), stderr = that / 2
    assert gen["alias"] == "ek100_mqa" and gen["accuracy_text,none"] == 0.5
    assert math.isclose(gen["accuracy_text_stderr,none"], math.sqrt(1 / 3) / 2)
    score = content["results"]["ek100_mqa_score"]
    assert score["accuracy_letter,none"] == 0.5 and score["accuracy_letter_normalized,none"] == 0.5
    assert content["n-samples"]["ek100_mqa"] == {"original": 10, "effective": 4}
    assert content["configs"]["ek100_mqa"]["output_type"] == "generate_until"
    assert content["configs"]["ek100_mqa_score"]["output_type"] == "multiple_choice"
    assert content["configs"]["ek100_mqa"]["generation_kwargs"] == {"max_new_tokens": 32}
    assert content["higher_is_better"]["ek100_mqa"] == {"accuracy_text": True, "accuracy_letter": True}
    assert content["config"]["model_args"] == "pretrained=ckpt/llavaction-7b" and content["config"]["limit"] == 4
    assert content["model_name_sanitized"] == "ckpt__llavaction-7b" and content["n-shot"]["ek100_mqa"] == 0


def test_samples_records_and_hashes():
    content, samples = build()
    gen = samples["ek100_mqa"]
    doc0 = {k: v for k, v in PREDS[0].items() if k not in ("index", "prompt_tokens", "generate", "score")}
    doc_hash = hashlib.sha256(json.dumps(doc0, indent=2, ensure_ascii=False).encode()).hexdigest()
    assert gen[0] == {"doc_id": 0, "doc_hash": doc_hash, "input": "<image>\nq0", "target": "open door",
                      "resps": ["A. open door"], "filtered_resps": "open door", "accuracy_text": 1.0,
                      "accuracy_letter": 1.0, "uid": "P01_0"}
    assert "resps" not in gen[3] and gen[3]["filtered_resps"] == "take cup"  # raw == parsed: one copy
    assert samples["ek100_mqa_score"][1]["filtered_resps"] == [[-2.5, False], [-0.5, False], [-3.0, False]]
    assert samples["ek100_mqa_score"][1]["accuracy_letter_normalized"] == 1.0
    expected = hashlib.sha256("".join(f"sample_{i}" + r["doc_hash"] for i, r in enumerate(gen)).encode()).hexdigest()
    assert content["task_hashes"]["ek100_mqa"] == expected


def test_files_are_named_as_lmms_eval_names_them(tmp_path):
    content, samples = build()
    paths = lmms_layout.write(tmp_path, content, samples)
    folder = tmp_path / "lmms_eval" / "ckpt__llavaction-7b"
    stamp = "20261128_000000"  # 1795824000 s = 2026-11-28 00:00:00 UTC
    assert sorted(p.name for p in paths) == sorted(
        [f"{stamp}_results.json", f"{stamp}_samples_ek100_mqa.jsonl", f"{stamp}_samples_ek100_mqa_score.jsonl"])
    written = json.loads((folder / f"{stamp}_results.json").read_text())
    assert written["results"]["ek100_mqa"]["accuracy_text,none"] == 0.5
    lines = (folder / f"{stamp}_samples_ek100_mqa.jsonl").read_text().splitlines()
    assert [json.loads(line)["doc_id"] for line in lines] == [0, 1, 2, 3]
