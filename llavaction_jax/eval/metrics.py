"""Metrics of an evaluation, computed from the per-question prediction records alone (so they can be recomputed
from predictions.jsonl).

Per answer mode:
* ``generate`` (upstream's): accuracy by exact answer text (upstream's metric: parsed text == GT text) and by letter;
* ``score`` (ours): the option with the highest log-likelihood; accuracy by letter, by text (the picked option's
  text == GT text; equal to the letter accuracy when option texts are distinct) and length-normalised.
Breakdowns (per verb / noun for EK100, per category for generic QA) use each mode's headline correctness
(``generate``: text, ``score``: letter). Confusions count (GT, prediction) pairs over wrong answers, for the answer
text and, where the question file names the action behind each option, for the verb and the noun.

EK100 (records with ``option_vns`` and ``gt_vn``), the paper's recognition metrics (:func:`ek100_metrics`): per mode
action / verb / noun top-1 of the chosen option's action (the option the answer names; none chosen counts wrong),
the candidates' recall (the GT among the options: the ceiling of the recognition protocol, 1 for EK100-MQA) and the
action model's own top-1 (its first prediction's action, verb and noun; avion / tim files).

``chance``: the accuracy a uniform random pick among each question's options would reach (:func:`chance_accuracy`),
drawn on accuracy.png as a dashed line.
"""

from __future__ import annotations

import collections

MODES = ("generate", "score")
HEADLINE = {"generate": "correct_text", "score": "correct_letter"}  # generate: upstream's metric


def _rate(correct: int, n: int) -> float | None:
    return correct / n if n else None


def mode_accuracy(preds: list[dict], mode: str) -> dict:
    rows = [p[mode] for p in preds if mode in p]
    n = len(rows)
    out = {"n": n}
    keys = (("correct_text", "correct_letter", "no_letter") if mode == "generate"
            else ("correct_text", "correct_letter", "correct_letter_normalized"))
    for key in keys:
        count = sum(bool(r["letter"] is None) if key == "no_letter" else bool(r[key]) for r in rows)
        out[key] = count
        if key != "no_letter":
            out["accuracy" + key[len("correct"):]] = _rate(count, n)
    return out


def predicted_option_index(pred: dict, mode: str) -> int | None:
    letter = pred[mode]["letter"]
    letters = [o.split(". ", 1)[0] for o in pred["options"]]
    return letters.index(letter) if letter in letters else None


def predicted_text(pred: dict, mode: str) -> str:
    """What the model answered: the parsed generation, or the text of the option that scored highest."""
    if mode == "generate":
        return pred["generate"]["parsed"]
    index = predicted_option_index(pred, mode)
    return pred["options"][index].split(". ", 1)[-1] if index is not None else ""


def breakdown(preds: list[dict], group: str, mode: str, names: dict | None = None) -> list[dict]:
    """Accuracy per value of ``group`` (e.g. verb id), most frequent first (ties by key)."""
    counts: dict = collections.defaultdict(lambda: [0, 0])
    for p in preds:
        if mode in p and group in p.get("groups", {}):
            key = p["groups"][group]
            counts[key][0] += 1
            counts[key][1] += bool(p[mode][HEADLINE[mode]])
    names = names or {}
    rows = [{"key": key, "name": names.get(key, str(key)), "n": n, "correct": c, "accuracy": c / n}
            for key, (n, c) in counts.items()]
    return sorted(rows, key=lambda r: (-r["n"], str(r["key"])))


def _vn_part(vn: str | None, part: int) -> int | None:
    return None if vn is None else int(vn.split(":")[part])


def confusions(preds: list[dict], mode: str, names: dict | None = None, top: int = 10) -> dict:
    """Most frequent (GT, predicted) pairs among wrong answers: by answer text, and by verb / noun class when the
    records carry ``option_vns`` (EK100). A prediction that picks no option counts as "(none)"."""
    names = names or {}
    pairs = {"answer": collections.Counter(), "verb": collections.Counter(), "noun": collections.Counter()}
    for p in preds:
        if mode not in p or p[mode][HEADLINE[mode]]:
            continue
        pairs["answer"][(p["gt_text"], predicted_text(p, mode) or "(none)")] += 1
        if "option_vns" in p and "gt_vn" in p:
            index = predicted_option_index(p, mode)
            vn = p["option_vns"][index] if index is not None else None
            for part, level in enumerate(("verb", "noun")):
                gt, got = _vn_part(p["gt_vn"], part), _vn_part(vn, part)
                if gt != got:
                    level_names = names.get(level, {})
                    pairs[level][(level_names.get(gt, str(gt)),
                                  "(none)" if got is None else level_names.get(got, str(got)))] += 1
    ranked = {level: [{"gt": gt, "predicted": pr, "count": n}
                      for (gt, pr), n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
              for level, c in pairs.items()}
    return {level: rows for level, rows in ranked.items() if rows or level == "answer"}


def letter_distribution(preds: list[dict], mode: str) -> dict:
    """How often each letter is the GT and how often it is predicted (position bias)."""
    gt = collections.Counter(p["gt_letter"] for p in preds if mode in p and p["gt_letter"] is not None)
    got = collections.Counter(p[mode]["letter"] or "(none)" for p in preds if mode in p)
    return {"gt": dict(sorted(gt.items())), "predicted": dict(sorted(got.items()))}


def _vn_of(pred: dict, mode: str) -> str | None:
    index = predicted_option_index(pred, mode)
    return pred["option_vns"][index] if index is not None else None


def _same(vn: str | None, gt: str, part: int | None) -> bool:
    """vn == gt (part None), or the same verb (0) / noun (1)."""
    if vn is None:
        return False
    return vn == gt if part is None else _vn_part(vn, part) == _vn_part(gt, part)


EK100_FLAGS = ("action_top1", "verb_top1", "noun_top1")


def ek100_flags(pred: dict, mode: str) -> dict[str, bool]:
    """Per question: the chosen option's action / verb / noun equals the GT's; the GT is among the candidates; and,
    where the file names it, the action model's top-1 is right (``action_model_top1``)."""
    chosen, gt = _vn_of(pred, mode), pred["gt_vn"]
    flags = {name: _same(chosen, gt, part) for name, part in zip(EK100_FLAGS, (None, 0, 1))}
    flags["candidates_recall"] = gt in pred["option_vns"]
    if pred.get("top1_vn") is not None:
        flags["action_model_top1"] = pred["top1_vn"] == gt
    return flags


def ek100_metrics(preds: list[dict]) -> dict | None:
    """The paper's EK100 recognition metrics (module docstring), or None for files without option actions."""
    rows = [p for p in preds if "option_vns" in p and "gt_vn" in p]
    if not rows:
        return None
    out: dict = {"n": len(rows), "candidates_recall": sum(p["gt_vn"] in p["option_vns"] for p in rows) / len(rows)}
    for mode in MODES:
        answered = [p for p in rows if mode in p]
        if answered:
            flags = [ek100_flags(p, mode) for p in answered]
            out[mode] = {"n": len(answered), **{k: sum(f[k] for f in flags) / len(answered) for k in EK100_FLAGS}}
    with_top1 = [p for p in rows if p.get("top1_vn") is not None]
    if with_top1:
        out["action_model"] = {"n": len(with_top1), **{
            k: sum(_same(p["top1_vn"], p["gt_vn"], part) for p in with_top1) / len(with_top1)
            for k, part in zip(EK100_FLAGS, (None, 0, 1))}}
    return out


def chance_accuracy(preds: list[dict]) -> float | None:
    """The expected accuracy of a uniform random pick among each question's options: the mean of
    1 / len(options), a question whose options miss the ground truth (``gt_letter`` None) counting 0. For a file of
    5-option questions with the ground truth always among them, 1/5. None without questions that have options."""
    rows = [p for p in preds if p.get("options")]
    if not rows:
        return None
    return sum((1 / len(p["options"])) if p["gt_letter"] is not None else 0.0 for p in rows) / len(rows)


def compute_metrics(preds: list[dict], names: dict | None = None, top: int = 10) -> dict:
    """Everything in results.json that depends on the predictions only."""
    names = names or {}
    modes = [m for m in MODES if any(m in p for p in preds)]
    found = {g for p in preds for g in p.get("groups", {})}
    groups = [g for g in ("verb", "noun") if g in found] + sorted(found - {"verb", "noun"})
    out = {
        "num_questions": len(preds),
        "num_without_gt": sum(p["gt_letter"] is None for p in preds),
        "chance": chance_accuracy(preds),
        "modes": {m: mode_accuracy(preds, m) for m in modes},
        "breakdowns": {g: {m: breakdown(preds, g, m, names.get(g)) for m in modes} for g in groups},
        "confusions": {m: confusions(preds, m, names, top) for m in modes},
        "letters": {m: letter_distribution(preds, m) for m in modes},
    }
    with_top1 = [p for p in preds if p.get("top1_text") is not None]
    if with_top1:  # upstream's "Avion accuracy": the action model's own top-1 (avion / tim question files)
        out["action_model_top1_accuracy"] = sum(p["top1_text"] == p["gt_text"] for p in with_top1) / len(with_top1)
    ek100 = ek100_metrics(preds)
    if ek100 is not None:
        out["ek100"] = ek100
    return out
