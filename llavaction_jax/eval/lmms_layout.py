"""`eval`'s results again, in lmms-eval's output layout, so analysis scripts written for lmms-eval read them.

lmms-eval (lmms_eval/evaluator.py: evaluate, lmms_eval/loggers/evaluation_tracker.py:
EvaluationTracker.save_results_aggregated / save_results_samples, in the 0.3 releases current when LLaVAction was
evaluated) writes, under its --output_path,

    <model_name_sanitized>/<YYYYMMDD_HHMMSS>_results.json           aggregated results of every task
    <model_name_sanitized>/<YYYYMMDD_HHMMSS>_samples_<task>.jsonl   one record per document (--log_samples)

We write the same under OUT/lmms_eval/. One answer mode is one lmms-eval task:

- a benchmark question file (build-bench): the benchmark's own lmms-eval task name (its variant, e.g. `videomme`,
  `mvbench`) for greedy generation read with the task's lmms-eval answer parser (eval/benchmarks/parsers.py),
  `<task>_score` for option scoring; one metric, `accuracy`, per sample whether the picked letter is the answer's,
  aggregated as results.json["benchmark"] aggregates it (MVBench: the mean over its tasks of the non-empty
  answers), so the two always agree;
- an EK100 file: `ek100_mqa` (generation, upstream LLaVAction's parsing) and `ek100_mqa_score`; another video QA
  file: `videoqa` / `videoqa_score`. Metrics are means of per-sample 0/1 values, as lmms-eval's "mean" aggregation
  with its standard error (the sample standard deviation over sqrt(n)):

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

A samples line, in lmms-eval 0.3's key order: doc_id (the question's line in the question file), doc (the question
record), target (as a string: ek100 the ground-truth text, upstream's target; video QA the letter), arguments (as
the tracker rewrites them: the request's second argument indexed by position, so for generation the names of the
generation kwargs, for option scoring the characters of the first continuation " <option>"), resps (one list per
request: [[raw text]] for generation, [[[log-likelihood, is-greedy]]] per option for scoring), filtered_resps (a
list, one entry per request: [parsed answer], or [log-likelihood, is-greedy] per option; scoring values as strings,
as lmms-eval's sanitize_list writes them; is-greedy is not computed and written "False"), doc_hash, prompt_hash,
target_hash (sha256 of the doc's indented JSON, of the input, of the target), the per-sample metrics, and input
(the user message; for video QA without the per-clip time instruction).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pathlib
import re

from llavaction_jax.eval.benchmarks import score as benchmark_score
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


def task_name(fmt: str, mode: str, variant=None) -> str:
    base = variant.name if variant is not None else "ek100_mqa" if fmt == "ek100" else "videoqa"
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


def sample_record(pred: dict, mode: str, fmt: str, user_message: str, gen_kwargs: dict, variant=None) -> dict:
    doc = {k: v for k, v in pred.items() if k not in _NOT_DOC}
    target = str(pred["gt_letter"]) if variant is not None or fmt != "ek100" else pred["gt_text"]
    answer = pred[mode]
    if mode == "generate":
        second, resps, filtered = list(gen_kwargs), [[answer["raw"]]], [answer["parsed"]]
    else:
        texts = [o.split(". ", 1)[-1] for o in pred["options"]]
        second = f" {texts[0]}" if texts else ""
        resps = [[[str(value), "False"]] for value in answer["logprob_sum"]]
        filtered = [[str(value), "False"] for value in answer["logprob_sum"]]
    record = {"doc_id": pred["index"], "doc": doc, "target": target,
              "arguments": {str(i): item for i, item in enumerate(second)}, "resps": resps,
              "filtered_resps": filtered, "doc_hash": sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
              "prompt_hash": sha256(user_message), "target_hash": sha256(target)}
    if variant is not None:
        if variant.has_answers:
            picked = benchmark_score.picked_letter(pred, mode, variant)
            record["accuracy"] = float(picked is not None and picked == pred["gt_letter"])
    else:
        for metric in METRICS[mode]:
            record[metric] = float(bool(answer[_SOURCE_KEYS[mode][metric]]))
        if "option_vns" in pred and "gt_vn" in pred:
            record.update({metric: float(flag) for metric, flag in ek100_flags(pred, mode).items()})
    record["input"] = user_message
    return record


def task_metrics(mode: str, samples: list[dict], variant=None) -> tuple[str, ...]:
    """The mode's metrics, then the EK100 ones its samples carry (every sample of a file has the same keys)."""
    if variant is not None:
        return ("accuracy",) if variant.has_answers else ()
    extra = [m for m in ("action_top1", "verb_top1", "noun_top1", "candidates_recall", "action_model_top1")
             if samples and m in samples[0]]
    return (*METRICS[mode], *extra)


def build(preds: list[dict], user_messages: list[str], *, fmt: str, modes, questions_path: str, total_questions: int,
          model_name: str, batch_size: int, limit: int | None, gen_kwargs: dict, device: str, wall_s: float,
          date: float, meta: dict | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """(results.json content, {task: samples records}) for `preds` (predictions.jsonl records, file order) of the
    question file whose sidecar meta is `meta` (a build-bench meta names the benchmark's task)."""
    variant = benchmark_score.variant_of(meta)
    samples = {task_name(fmt, m, variant): [sample_record(p, m, fmt, u, gen_kwargs, variant)
                                            for p, u in zip(preds, user_messages)] for m in modes}
    results, configs, higher = {}, {}, {}
    for mode in modes:
        task = task_name(fmt, mode, variant)
        results[task] = {"alias": task}
        names = task_metrics(mode, samples[task], variant)
        for metric in names:
            mean, stderr = mean_and_stderr([s[metric] for s in samples[task]])
            if variant is not None:  # the benchmark's own aggregate (MVBench: per task, non-empty answers)
                mean = benchmark_score.score_mode(preds, mode, variant)["headline"]
            results[task][f"{metric},none"] = mean
            results[task][f"{metric}_stderr,none"] = stderr
        higher[task] = {metric: True for metric in names}
        aggregation = variant.aggregate if variant is not None and variant.aggregate != "micro" else "mean"
        configs[task] = {
            "task": task, "dataset_path": str(questions_path), "test_split": "test", "num_fewshot": 0,
            "output_type": "generate_until" if mode == "generate" else "multiple_choice",
            "metric_list": [{"metric": m, "aggregation": aggregation, "higher_is_better": True} for m in names],
            **({"generation_kwargs": gen_kwargs} if mode == "generate" else {}),
            "metadata": {"version": VERSION, "producer": "llavaction_jax eval",
                         **({"answer_parser": variant.parser} if variant is not None and mode == "generate" else {})}}
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
