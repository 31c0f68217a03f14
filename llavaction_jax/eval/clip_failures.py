"""Questions whose clip cannot be read: recorded as failed instead of stopping the evaluation.

A clip that is missing from the shards, or whose record does not decode (a damaged shard), makes its question a
*failed* prediction record: the usual record with ``"failed": "<why>"``, no answer (letter None, every
``correct_*`` false), so the metrics count it wrong and results.json lists it under ``failed``. ``--strict``
restores the old behaviour (the first unreadable clip stops the run). A failed record is not kept by a resume: a
rerun answers it again, e.g. once the shards are repaired.
"""

from __future__ import annotations


class ClipUnreadable(RuntimeError):
    """--strict: a question's clip could not be read."""


def failed_answer(mode: str) -> dict:
    if mode == "generate":
        return {"raw": "", "parsed": "", "letter": None, "correct_text": False, "correct_letter": False,
                "num_tokens": 0}
    return {"letter": None, "correct_letter": False, "correct_text": False, "letter_normalized": None,
            "correct_letter_normalized": False, "logprob_sum": [], "logprob_mean": [], "num_tokens": []}


def failed_record(question, info: dict, modes) -> dict:
    """The prediction record of a question whose clip could not be read (same keys as an answered one)."""
    return {"index": info["index"], "uid": question.uid, "clip_uid": info["clip_uid"],
            "options": list(question.options), "gt_letter": question.gt_letter, "gt_text": question.gt_text,
            "groups": question.groups, **question.extra, "num_frames": 0, "prompt_tokens": info["prompt_tokens"],
            "failed": info["error"], **{m: failed_answer(m) for m in modes}}


def describe(error: BaseException) -> str:
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def failures_summary(records: list[dict]) -> list[dict]:
    """results.json's ``failed``: one entry per failed question, in file order."""
    return [{"index": r["index"], "uid": r["uid"], "clip_uid": r["clip_uid"], "error": r["failed"]}
            for r in records if r.get("failed")]
