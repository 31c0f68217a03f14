"""Metrics of an evaluation, computed from the per-question prediction records alone (so they can be recomputed
from predictions.jsonl).

Per answer mode:
* ``generate`` (upstream's): accuracy by exact answer text (upstream's metric: parsed text == GT text) and by letter;
* ``score`` (ours): the option with the highest log-likelihood; accuracy by letter, by text (the picked option's
  text == GT text; equal to the letter accuracy when option texts are distinct) and length-normalised.
Breakdowns (per verb / noun for EK100, per category for generic QA) use each mode's headline correctness
(``generate``: text, ``score``: letter). Confusions count (GT, prediction) pairs over wrong answers, for the answer
text and, where the question file names the action behind each option, for the verb and the noun.
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


def compute_metrics(preds: list[dict], names: dict | None = None, top: int = 10) -> dict:
    """Everything in results.json that depends on the predictions only."""
    names = names or {}
    modes = [m for m in MODES if any(m in p for p in preds)]
    found = {g for p in preds for g in p.get("groups", {})}
    groups = [g for g in ("verb", "noun") if g in found] + sorted(found - {"verb", "noun"})
    out = {
        "num_questions": len(preds),
        "num_without_gt": sum(p["gt_letter"] is None for p in preds),
        "modes": {m: mode_accuracy(preds, m) for m in modes},
        "breakdowns": {g: {m: breakdown(preds, g, m, names.get(g)) for m in modes} for g in groups},
        "confusions": {m: confusions(preds, m, names, top) for m in modes},
        "letters": {m: letter_distribution(preds, m) for m in modes},
    }
    with_top1 = [p for p in preds if p.get("top1_text") is not None]
    if with_top1:  # upstream's "Avion accuracy": the action model's own top-1 (avion / tim question files)
        out["action_model_top1_accuracy"] = sum(p["top1_text"] == p["gt_text"] for p in with_top1) / len(with_top1)
    return out
