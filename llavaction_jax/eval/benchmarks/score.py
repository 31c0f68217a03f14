"""The official score of a benchmark run, from its prediction records alone: each generation re-read with the
benchmark's lmms-eval parser (parsers.py), accuracy overall and per official breakdown, the EgoSchema submission
file, and the report section. ``eval`` calls :func:`benchmark_results` when the question file's meta says it was
written by ``build-bench``; the result goes to results.json under ``"benchmark"``.

Per answer mode: ``generate`` reads the greedy generation with the task's parser (lmms-eval's way);
``score`` takes the option with the highest log-likelihood (ours; no parsing involved).
"""

from __future__ import annotations

import collections
import json
import pathlib

from llavaction_jax.eval.benchmarks import common, parsers

SUBMISSION_NAME = "egoschema_submission.json"


def variant_of(meta: dict | None) -> common.Variant | None:
    if not meta or meta.get("format") != common.FORMAT_NAME:
        return None
    spec = dict(meta["variant_spec"])
    spec["groups"] = tuple(spec.get("groups", ()))
    return common.Variant(**spec)


def picked_letter(pred: dict, mode: str, variant: common.Variant) -> str | None:
    if mode == "generate":
        return parsers.PARSERS[variant.parser](pred["generate"]["raw"], pred["options"])
    return pred["score"]["letter"]


def _accuracy(rows: list[tuple[bool, bool]]) -> dict:
    """rows of (counted, correct) -> {n, correct, accuracy}; uncounted rows (MVBench: empty answers) are left out."""
    counted = [correct for kept, correct in rows if kept]
    return {"n": len(counted), "correct": sum(counted), "accuracy": sum(counted) / len(counted) if counted else None}


def score_mode(preds: list[dict], mode: str, variant: common.Variant) -> dict:
    letters = [picked_letter(p, mode, variant) for p in preds]
    # lmms-eval's MVBench aggregate skips empty generations; every other task counts every question. A question
    # whose clip could not be read (eval/clip_failures.py) has no generation but is counted, wrong.
    kept = [bool(p.get("failed")) or not (variant.aggregate == "mvbench" and mode == "generate"
                                          and not p["generate"]["raw"].strip()) for p in preds]
    rows = [(k, letter is not None and letter == p["gt_letter"]) for p, k, letter in zip(preds, kept, letters)]
    out = {"unparsed": sum(letter is None for letter in letters), **_accuracy(rows), "breakdowns": {}}
    for group in variant.groups:
        by_value = collections.defaultdict(list)
        for p, row in zip(preds, rows):
            by_value[str(p.get("groups", {}).get(group, ""))].append(row)
        out["breakdowns"][group] = {value: _accuracy(r) for value, r in sorted(by_value.items())}
    if variant.aggregate == "mvbench":
        tasks = [v["accuracy"] for v in out["breakdowns"]["task"].values() if v["accuracy"] is not None]
        out["task_mean"] = sum(tasks) / len(tasks) if tasks else None
    out["headline"] = out["task_mean"] if variant.aggregate == "mvbench" else out["accuracy"]
    return out


def benchmark_results(meta: dict | None, preds: list[dict]) -> dict | None:
    """results.json's "benchmark" section, or None for a question file not written by build-bench."""
    variant = variant_of(meta)
    if variant is None:
        return None
    modes = [m for m in ("generate", "score") if any(m in p for p in preds)]
    out = {"benchmark": variant.benchmark, "variant": variant.name, "parser": variant.parser,
           "settings": meta.get("settings", {}), "has_answers": variant.has_answers}
    if variant.has_answers:
        out["modes"] = {m: score_mode(preds, m, variant) for m in modes}
    else:
        out["submission"] = {m: submission(preds, m, variant) for m in modes}
    return out


def submission(preds: list[dict], mode: str, variant: common.Variant) -> dict:
    """{submission key: picked option index}, -1 where no letter could be read (lmms-eval draws a random one)."""
    out = {}
    for p in preds:
        letter = picked_letter(p, mode, variant)
        out[p["submission_key"]] = parsers.LETTERS.index(letter) if letter is not None else -1
    return out


def write_outputs(results: dict, out_dir) -> list[str]:
    """The benchmark's extra files (the EgoSchema submission) and its report.md section; returns the files."""
    section = results.get("benchmark")
    if section is None:
        return []
    out_dir = pathlib.Path(out_dir)
    written = []
    for mode, entries in section.get("submission", {}).items():
        name = SUBMISSION_NAME if mode == "generate" else SUBMISSION_NAME.replace(".json", f".{mode}.json")
        (out_dir / name).write_text(json.dumps(entries, indent=1) + "\n")
        written.append(name)
    with open(out_dir / "report.md", "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(report_lines(section, written)) + "\n")
    return written


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def report_lines(section: dict, files: list[str]) -> list[str]:
    lines = [f"## {section['variant']} (official scoring: lmms-eval's {section['parser']} answer parser)", ""]
    if not section["has_answers"]:
        return lines + [f"Answers withheld: predictions for the official server in {', '.join(files)}."]
    lines += ["| mode | score (%) | n | correct | unparsed |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {_pct(s['headline'])} | {s['n']} | {s['correct']} | {s['unparsed']} |"
              for m, s in section["modes"].items()]
    for mode, stats in section["modes"].items():
        for group, values in stats["breakdowns"].items():
            lines += ["", f"### {section['variant']} per {group} ({mode})", "", f"| {group} | accuracy (%) | n |",
                      "|---|---|---|"]
            lines += [f"| {v} | {_pct(s['accuracy'])} | {s['n']} |" for v, s in values.items()]
    return lines
