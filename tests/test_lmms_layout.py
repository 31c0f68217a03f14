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
    """A line as lmms-eval 0.3's evaluator builds it and its tracker writes it (evaluator.py: evaluate,
    evaluation_tracker.py: save_results_samples): doc and arguments kept, filtered_resps a list, hashes of the doc,
    the prompt and the target."""
    content, samples = build()
    gen = samples["ek100_mqa"]
    doc0 = {k: v for k, v in PREDS[0].items() if k not in ("index", "prompt_tokens", "generate", "score")}
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()
    assert gen[0] == {"doc_id": 0, "doc": doc0, "target": "open door",
                      "arguments": {"0": "max_new_tokens"}, "resps": [["A. open door"]],
                      "filtered_resps": ["open door"], "doc_hash": sha(json.dumps(doc0, indent=2, ensure_ascii=False)),
                      "prompt_hash": sha("<image>\nq0"), "target_hash": sha("open door"),
                      "accuracy_text": 1.0, "accuracy_letter": 1.0, "input": "<image>\nq0"}
    assert list(gen[0]) == ["doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "doc_hash",
                            "prompt_hash", "target_hash", "accuracy_text", "accuracy_letter", "input"]
    score = samples["ek100_mqa_score"][1]
    # multiple choice: one loglikelihood request per option, (log-likelihood, is_greedy) sanitised to strings
    assert score["filtered_resps"] == [["-2.5", "False"], ["-0.5", "False"], ["-3.0", "False"]]
    assert score["resps"] == [[["-2.5", "False"]], [["-0.5", "False"]], [["-3.0", "False"]]]
    assert score["arguments"] == {str(i): c for i, c in enumerate(" open door")}  # the first continuation
    assert score["accuracy_letter_normalized"] == 1.0
    expected = hashlib.sha256("".join(f"sample_{i}" + r["doc_hash"] for i, r in enumerate(gen)).encode()).hexdigest()
    assert content["task_hashes"]["ek100_mqa"] == expected


def test_a_benchmark_file_is_its_lmms_eval_task_scored_with_its_parser():
    """NExT-QA: lmms-eval's parser (the last "(X)") reads "The answer is (B) close door. A. open door is wrong" as B,
    LLaVAction's as "open door": the lmms-eval task must be nextqa_mc_test and score it right, as
    results.json["benchmark"] does."""
    from llavaction_jax.eval.benchmarks import VARIANTS
    from llavaction_jax.eval.benchmarks import score as benchmark_score

    meta = {"format": "llavaction_jax.benchmark", "variant_spec": {**VARIANTS["nextqa_mc_test"].__dict__}}
    preds = [dict(pred(0, "The answer is (B) close door. A. open door is wrong", "open door is wrong", False, False,
                       [-2.0, -1.0, -3.0], True, True, True), gt_letter="B", gt_text="close door"),
             dict(pred(1, "C", "C", False, False, [-1.0, -2.0, -3.0], False, False, False), gt_letter="B",
                  gt_text="close door")]
    preds[0]["score"]["letter"] = "B"  # the option with the highest sum
    content, samples = lmms_layout.build(
        preds, ["<image>\nq0", "<image>\nq1"], fmt="videoqa", modes=("generate", "score"), questions_path="q.jsonl",
        total_questions=2, model_name="m", batch_size=2, limit=None, gen_kwargs={"max_new_tokens": 16}, device="cpu",
        wall_s=1.0, date=1795824000.0, meta=meta)
    assert set(content["results"]) == set(samples) == {"nextqa_mc_test", "nextqa_mc_test_score"}
    assert [s["accuracy"] for s in samples["nextqa_mc_test"]] == [1.0, 0.0]
    assert [s["target"] for s in samples["nextqa_mc_test"]] == ["B", "B"]
    assert content["results"]["nextqa_mc_test"]["accuracy,none"] == 0.5
    assert content["configs"]["nextqa_mc_test"]["metadata"]["answer_parser"] == "mmmu_last"
    assert [s["accuracy"] for s in samples["nextqa_mc_test_score"]] == [1.0, 0.0]  # best sums: B, then A
    official = benchmark_score.benchmark_results(meta, preds)["modes"]
    assert content["results"]["nextqa_mc_test"]["accuracy,none"] == official["generate"]["headline"]
    assert content["results"]["nextqa_mc_test_score"]["accuracy,none"] == official["score"]["headline"] == 0.5


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
