"""`eval`'s results again, in lmms-eval's output layout, so analysis scripts written for lmms-eval read them.

lmms-eval (lmms_eval/evaluator.py: simple_evaluate / evaluate, lmms_eval/loggers/evaluation_tracker.py:
EvaluationTracker.save_results_aggregated / save_results_samples) writes, under its --output_path,

    <model_name_sanitized>/<YYYYMMDD_HHMMSS>_results.json           aggregated results of every task
    <model_name_sanitized>/<YYYYMMDD_HHMMSS>_samples_<task>.jsonl   one record per document (--log_samples)

We write the same under OUT/lmms_eval/. One answer mode is one lmms-eval task: `ek100_mqa` (or `videoqa`) for
greedy generation with upstream's parsing, `ek100_mqa_score` (`videoqa_score`) for option scoring. Per task the
metrics are the means of per-sample 0/1 values, as lmms-eval's "mean" aggregation with its standard error (the
sample standard deviation over sqrt(n)):

    accuracy_text     parsed answer (generate) or best-scoring option text (score) == the ground-truth text
                      (upstream LLaVAction's metric)
    accuracy_letter   the answer's letter == the ground-truth letter
    accuracy_letter_normalized   (score only) the same with the length-normalised log-likelihood
    action_top1, verb_top1, noun_top1, candidates_recall, action_model_top1   (EK100 files with option actions:
                      eval/metrics.py: ek100_flags; action_model_top1 where the file names the model's top-1)

results.json: "results" {task: {"alias", "<metric>,none", "<metric>_stderr,none"}}, "group_subtasks", "configs"
(a task config: task, output_type, dataset_path, metric_list, generation_kwargs), "versions", "n-shot",
"higher_is_better", "n-samples" {original, effective}, "config" (model, model_args, batch_size, limit,
gen_kwargs, ...), "date", "task_hashes", and the tracker's model_name / model_name_sanitized / timing fields.

A samples record (as the tracker saves it: "doc" and "arguments" dropped, "input" kept): doc_id (the question's
line in the question file), doc_hash (sha256 of the question's JSON), input (the user message; for video QA
without the per-clip time instruction), target (ek100: the ground-truth text, upstream's target; videoqa: the
letter, as lmms-eval's multiple-choice tasks), filtered_resps (generate: the parsed answer, with the raw text in
resps when it differs; score: [log-likelihood, false] per option, lmms-eval's multiple_choice form), the
per-sample metrics above, and uid.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pathlib
import re

from llavaction_jax.eval.metrics import ek100_flags

VERSION = 1
METRICS = {"generate": ("accuracy_text", "accuracy_letter"),
           "score": ("accuracy_text", "accuracy_letter", "accuracy_letter_normalized")}
_SOURCE_KEYS = {"generate": {"accuracy_text": "correct_text", "accuracy_letter": "correct_letter"},
                "score": {"accuracy_text": "correct_text", "accuracy_letter": "correct_letter",
                          "accuracy_letter_normalized": "correct_letter_normalized"}}
_NOT_DOC = ("index", "prompt_tokens", "generate", "score")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_name(fmt: str, mode: str) -> str:
    base = "ek100_mqa" if fmt == "ek100" else "videoqa"
    return base if mode == "generate" else f"{base}_{mode}"


def sanitize_model_name(name: str) -> str:
    """lmms-eval's folder name for a model: its last two path parts, unsafe characters runs -> "__"."""
    parts = name.split("/")
    return re.sub(r"[\"<>:/|\\?*\[\] ]+", "__", "/".join(parts[-2:]))


def mean_and_stderr(values: list[float]) -> tuple[float | None, float | str]:
    n = len(values)
    if n == 0:
        return None, "N/A"
    mean = sum(values) / n
    if n < 2:
        return mean, "N/A"
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def sample_record(pred: dict, mode: str, fmt: str, user_message: str) -> dict:
    doc = {k: v for k, v in pred.items() if k not in _NOT_DOC}
    record = {"doc_id": pred["index"], "doc_hash": sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
              "input": user_message, "target": pred["gt_text"] if fmt == "ek100" else str(pred["gt_letter"])}
    answer = pred[mode]
    if mode == "generate":
        if answer["raw"] != answer["parsed"]:
            record["resps"] = [answer["raw"]]
        record["filtered_resps"] = answer["parsed"]
    else:
        record["filtered_resps"] = [[value, False] for value in answer["logprob_sum"]]
    for metric in METRICS[mode]:
        record[metric] = float(bool(answer[_SOURCE_KEYS[mode][metric]]))
    if "option_vns" in pred and "gt_vn" in pred:
        record.update({metric: float(flag) for metric, flag in ek100_flags(pred, mode).items()})
    record["uid"] = pred["uid"]
    return record


def task_metrics(mode: str, samples: list[dict]) -> tuple[str, ...]:
    """The mode's metrics, then the EK100 ones its samples carry (every sample of a file has the same keys)."""
    extra = [m for m in ("action_top1", "verb_top1", "noun_top1", "candidates_recall", "action_model_top1")
             if samples and m in samples[0]]
    return (*METRICS[mode], *extra)


def build(preds: list[dict], user_messages: list[str], *, fmt: str, modes, questions_path: str, total_questions: int,
          model_name: str, batch_size: int, limit: int | None, gen_kwargs: dict, device: str, wall_s: float,
          date: float) -> tuple[dict, dict[str, list[dict]]]:
    """(results.json content, {task: samples records}) for `preds` (predictions.jsonl records, file order)."""
    samples = {task_name(fmt, m): [sample_record(p, m, fmt, u) for p, u in zip(preds, user_messages)] for m in modes}
    results, configs, higher = {}, {}, {}
    for mode in modes:
        task = task_name(fmt, mode)
        results[task] = {"alias": task}
        names = task_metrics(mode, samples[task])
        for metric in names:
            mean, stderr = mean_and_stderr([s[metric] for s in samples[task]])
            results[task][f"{metric},none"] = mean
            results[task][f"{metric}_stderr,none"] = stderr
        higher[task] = {metric: True for metric in names}
        configs[task] = {
            "task": task, "dataset_path": str(questions_path), "test_split": "test", "num_fewshot": 0,
            "output_type": "generate_until" if mode == "generate" else "multiple_choice",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names],
            **({"generation_kwargs": gen_kwargs} if mode == "generate" else {}),
            "metadata": {"version": VERSION, "producer": "llavaction_jax eval"}}
    hashes = {task: sha256("".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(recs)))
              for task, recs in samples.items()}
    content = {
        "results": results,
        "group_subtasks": {task: [] for task in results},
        "configs": configs,
        "versions": {task: VERSION for task in results},
        "n-shot": {task: 0 for task in results},
        "higher_is_better": higher,
        "n-samples": {task: {"original": total_questions, "effective": len(preds)} for task in results},
        "config": {"model": "llavaction_jax", "model_args": f"pretrained={model_name}", "batch_size": batch_size,
                   "batch_sizes": [], "device": device, "use_cache": None, "limit": limit, "offset": 0,
                   "bootstrap_iters": 0, "gen_kwargs": gen_kwargs, "random_seed": None, "numpy_seed": None,
                   "torch_seed": None, "fewshot_seed": None},
        "git_hash": None,
        "date": date,
        "task_hashes": hashes,
        "model_source": "llavaction_jax",
        "model_name": model_name,
        "model_name_sanitized": sanitize_model_name(model_name),
        "total_evaluation_time_seconds": str(wall_s),
    }
    return content, samples


def write(out_dir: str | pathlib.Path, content: dict, samples: dict[str, list[dict]]) -> list[pathlib.Path]:
    """Write lmms-eval's files under OUT/lmms_eval/<model>/, named by the UTC time of `content["date"]`."""
    folder = pathlib.Path(out_dir) / "lmms_eval" / content["model_name_sanitized"]
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.fromtimestamp(content["date"], datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    paths = [folder / f"{stamp}_results.json"]
    paths[0].write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for task, records in samples.items():
        path = folder / f"{stamp}_samples_{task}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths
