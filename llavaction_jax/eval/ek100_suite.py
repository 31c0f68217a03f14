"""``eval-suite --suite ek100``: the paper's EPIC-KITCHENS-100 evaluations in one run and one table.

Input layout (built beforehand with ``build-mqa`` and ``extract-frames``; docs/ek100.md gives the commands):
``DATA/<variant>/questions.jsonl`` and ``DATA/<variant>/shards`` (a link to a shared extraction is fine) for the
variants below; a missing one is listed as not run. ``ek100_mqa_tim_16f_prior_pseudo`` needs no folder of its own:
it is derived from the oracle variant's questions and the answers this run gave to ``ek100_mqa_tim_16f`` (the
model's own earlier predictions, upstream's ``--pseudo_folder``), and written to OUT/<variant>/questions.jsonl.

Each variant's full evaluation goes to OUT/<variant>/; the table to OUT/ek100.md and OUT/ek100.json: per variant
ours (generate: upstream's text metric; score: the option log-likelihood), action / verb / noun top-1 of the chosen
option, the candidates' recall, the action model's own top-1, and the paper's number with its source.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from llavaction_jax.ek100 import mqa, prior_actions

QUESTIONS_NAME = "questions.jsonl"


@dataclasses.dataclass(frozen=True)
class Row:
    variant: str  # folder under DATA and OUT
    title: str
    paper: float | None = None  # LLaVAction-7B in the paper, percent
    source: str = "not in the public sources we have (arXiv 2503.18712's tables)"
    pseudo_of: tuple[str, str] | None = None  # (oracle variant, variant whose predictions stand in for the GT)


FIGURE_1 = "paper Fig. 1 (values in upstream llavaction_figs/Fig1.ipynb; frame count not stated)"
ROWS = (
    Row("ek100_mqa_random_8f", "EK100-MQA, random 5 options, 8 frames"),
    Row("ek100_mqa_random_16f", "EK100-MQA, random 5 options, 16 frames", 85.3, FIGURE_1 + ", 'random 5 choices'"),
    Row("ek100_mqa_avion_8f", "EK100-MQA, AVION top-5, 8 frames"),
    Row("ek100_mqa_avion_16f", "EK100-MQA, AVION top-5, 16 frames"),
    Row("ek100_mqa_tim_8f", "EK100-MQA, TIM top-5, 8 frames"),
    Row("ek100_mqa_tim_16f", "EK100-MQA, TIM top-5, 16 frames", 74.1, FIGURE_1 + ", 'TIM top-5 choices (hard)'"),
    Row("ek100_recognition_tim_top20_16f", "Recognition, TIM top-20 (GT not inserted), 16 frames"),
    Row("ek100_mqa_tim_16f_prior_oracle", "EK100-MQA, TIM top-5, 16 frames, prior actions (oracle)"),
    Row("ek100_mqa_tim_16f_prior_pseudo", "EK100-MQA, TIM top-5, 16 frames, prior actions (pseudo)",
        pseudo_of=("ek100_mqa_tim_16f_prior_oracle", "ek100_mqa_tim_16f")),
)


def pseudo_question_file(data: pathlib.Path, out: pathlib.Path, row: Row) -> pathlib.Path | None:
    """OUT/<variant>/questions.jsonl: the oracle questions with the previous actions' texts replaced by this run's
    answers for those clips; None when the oracle file or the earlier predictions are not there."""
    oracle, source = row.pseudo_of
    oracle_path, predictions = data / oracle / QUESTIONS_NAME, out / source / "predictions.jsonl"
    if not (oracle_path.is_file() and predictions.is_file()):
        return None
    meta, records = mqa.read_question_file(oracle_path)
    settings = mqa.MQASettings(**{k: v for k, v in (meta or {}).get("settings", {}).items()
                                  if k in {f.name for f in dataclasses.fields(mqa.MQASettings)}})
    pseudo = prior_actions.PseudoPredictions(predictions)
    derived = [mqa.with_prior(q, prior_actions.with_pseudo(q["prior_actions"], pseudo, q["uid"]), settings)
               if q.get("prior_actions") else q for q in records]
    meta = {**(meta or {}), "settings": {**(meta or {}).get("settings", {}), "prior_actions": "pseudo"},
            "inputs": {**(meta or {}).get("inputs", {}), "pseudo_predictions": str(predictions)}}
    path = out / row.variant / QUESTIONS_NAME
    mqa.write_question_file(path, derived, meta)
    return path


def run(args, evaluate_variant, log=print) -> None:
    """Evaluate every variant that is built, in table order (the pseudo row after the run it reads)."""
    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    for row in ROWS:
        questions = data / row.variant / QUESTIONS_NAME
        shards = data / row.variant / "shards"
        if row.pseudo_of:
            questions = pseudo_question_file(data, out, row)
            shards = data / row.pseudo_of[0] / "shards"
        if questions is None or not questions.is_file():
            missing = (f"{data / row.pseudo_of[0] / QUESTIONS_NAME} or {out / row.pseudo_of[1] / 'predictions.jsonl'}"
                       if row.pseudo_of else str(data / row.variant / QUESTIONS_NAME))
            log(f"[eval-suite] {row.title}: no {missing}, skipped")
            continue
        log(f"[eval-suite] {row.title}: {questions}")
        evaluate_variant(questions, shards, out / row.variant)


def table(out_dir) -> dict:
    rows = []
    for row in ROWS:
        entry = {"variant": row.variant, "title": row.title, "paper_llavaction_7b": row.paper, "source": row.source}
        path = pathlib.Path(out_dir) / row.variant / "results.json"
        if not path.is_file():
            rows.append({**entry, "status": "not run"})
            continue
        results = json.loads(path.read_text())
        modes, ek100 = results["modes"], results.get("ek100", {})
        rows.append({**entry, "status": "ok", "n": results["num_questions"],
                     "generate_text": modes.get("generate", {}).get("accuracy_text"),
                     "score_letter": modes.get("score", {}).get("accuracy_letter"),
                     "chosen": {m: {k: ek100[m][k] for k in ("action_top1", "verb_top1", "noun_top1")}
                                for m in ("generate", "score") if m in ek100},
                     "candidates_recall": ek100.get("candidates_recall"),
                     "action_model_top1": ek100.get("action_model", {}).get("action_top1")})
    return {"suite": "ek100", "rows": rows}


def table_markdown(data: dict) -> str:
    pct = lambda x: "" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Suite ek100 (EPIC-KITCHENS-100 validation, LLaVAction-7B's paper numbers beside ours)", "",
             "| setting | n | generate, text (upstream metric) | score, letter | action / verb / noun top-1 "
             "(chosen option) | candidates' recall | action model top-1 | LLaVAction-7B (paper) | source | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        chosen = r.get("chosen", {})
        first = chosen.get("generate") or chosen.get("score") or {}
        top1 = " / ".join(pct(first.get(k)) for k in ("action_top1", "verb_top1", "noun_top1")) if first else ""
        paper = "" if r["paper_llavaction_7b"] is None else f"{r['paper_llavaction_7b']:.1f}"
        lines.append(f"| {r['title']} | {r.get('n', '')} | {pct(r.get('generate_text'))} | "
                     f"{pct(r.get('score_letter'))} | {top1} | {pct(r.get('candidates_recall'))} | "
                     f"{pct(r.get('action_model_top1'))} | {paper} | {r['source']} | "
                     f"{'' if r['status'] == 'ok' else r['status']} |")
    return "\n".join(lines) + "\n"


def write_table(out_dir) -> dict:
    data = table(out_dir)
    out_dir = pathlib.Path(out_dir)
    (out_dir / "ek100.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "ek100.md").write_text(table_markdown(data))
    return data
