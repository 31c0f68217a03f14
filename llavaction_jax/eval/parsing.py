"""Answer parsing and scoring of EK100-MQA (upstream llavaction/action/ek_eval.py: process_raw_pred,
ensemble_llava_evaluation).

Upstream's metric is exact equality of the parsed answer *text* with the ground-truth text; the letter metric is ours
(more robust to a model that answers "B" alone) and is reported beside it, never instead of it.
"""

from __future__ import annotations

import re

_LETTERED_ANSWER = re.compile(r"[A-Z]\.\s(.+)")  # '.' stops at newlines: one match per line at most
_AFTER_FIRST_PERIOD = re.compile(r"\.\s*.*$")
_BARE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*\.?\s*$")


def process_raw_pred(raw: str) -> str:
    """Upstream's ``process_raw_pred``: the text of the last ``"X. text"`` on any line, cut at its first period.

    A prediction containing "None" is returned with "None. " removed (checked before the lettered answers, as upstream
    does); one without any lettered answer is returned unchanged.
    """
    matches = _LETTERED_ANSWER.findall(raw)
    if "None" in raw:
        return raw.replace("None. ", "")
    if matches:
        return _AFTER_FIRST_PERIOD.sub("", matches[-1])
    return raw


def parse_answer(raw: str) -> str:
    """The answer text upstream scores: trailing commas stripped, then :func:`process_raw_pred`."""
    return process_raw_pred(raw.rstrip(","))


def answer_letter(raw: str, options: list[str]) -> str | None:
    """The option letter a generation picks, or None.

    In order: the letter of the last ``"X. "`` (the match :func:`process_raw_pred` uses); a bare letter such as
    ``"B"`` / ``"(B)"`` / ``"B."``; else the letter of the option whose text equals the parsed answer text.
    Letters beyond the question's options do not count.
    """
    valid = {option.split(". ", 1)[0] for option in options}
    lettered = re.findall(r"([A-Z])\.\s.+", raw.rstrip(","))
    bare = _BARE_LETTER.match(raw.rstrip(","))
    letter = lettered[-1] if lettered else bare.group(1) if bare else None
    if letter is None:
        text = parse_answer(raw)
        letter = next((o.split(". ", 1)[0] for o in options if o.split(". ", 1)[-1] == text), None)
    return letter if letter in valid else None


def score_answer(raw: str, options: list[str], gt_letter: str | None, gt_text: str) -> dict:
    """Parsed text, picked letter and both correctness flags of one generation."""
    parsed = parse_answer(raw)
    letter = answer_letter(raw, options)
    return {
        "parsed": parsed,
        "letter": letter,
        "correct_text": parsed == gt_text,  # upstream's metric
        "correct_letter": gt_letter is not None and letter == gt_letter,
    }
