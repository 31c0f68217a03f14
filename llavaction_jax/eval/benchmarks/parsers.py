"""lmms-eval's answer extraction, one function per family, reimplemented from its task code so a generation is
scored as lmms-eval scores it (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks/<task>/utils.py``, commit 75571cfe).

Every function takes the raw generation and the lettered options ("A. text") and returns the picked letter, or None when
nothing can be read. Where lmms-eval draws a *random* letter for an unreadable answer (EgoSchema, NExT-QA,
LongVideoBench), we return None, which counts as wrong: the expected score differs from lmms-eval's by
1/num_options per unreadable answer, and results.json counts them (``unparsed``) so the gap is visible.
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase
_STRIP = (",", ".", "!", "?", ";", ":", "'")


def _padded(response: str, strip_chars=_STRIP) -> str:
    for char in strip_chars:
        response = response.strip(char)
    return " " + response + " "


def _mentioned_options(text: str, choices: str, options: list[str]) -> list[str]:
    """lmms-eval's fallback for an answer of more than five words without a letter: the choices whose option text
    it contains."""
    if len(text.split()) <= 5:
        return []
    return [c for c, answer in zip(choices, options) if answer.lower() in text.lower()]


def mmmu_first(response: str, options: list[str]) -> str | None:
    """EgoSchema (``egoschema/utils.py: parse_multi_choice_response``): every "(X)", "X " and "X." candidate is
    collected; with several, the one whose last occurrence comes *first* wins; with none and a long answer, the
    options whose lettered text ("A. text", as its dataset stores them) appears in it."""
    choices = LETTERS[: len(options)]
    text = _padded(response)
    candidates = [f"({c})" for c in choices if f"({c})" in text]
    candidates += [f"{c} " for c in choices if f"{c} " in text]
    candidates += [f"{c}." for c in choices if f"{c}." in text]
    by_letter = bool(candidates)
    candidates = candidates or _mentioned_options(text, choices, options)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0].strip("(). ")
    if by_letter:
        positions = [text.rfind(c) for c in candidates]
    else:
        positions = [text.lower().rfind(options[choices.index(c)].lower()) for c in candidates]
    return candidates[positions.index(min(positions))].strip("(). ")


def mmmu_last(response: str, options: list[str]) -> str | None:
    """NExT-QA MC (``nextqa/utils.py: parse_multi_choice_response``): "(X)" candidates, else "X ", else "X.", else
    (long answers) option texts (unlettered there); with several, the last occurrence wins (for bare letters, of
    " X ")."""
    choices = LETTERS[: len(options)]
    options = [o.split(". ", 1)[-1] for o in options]
    text = _padded(response)
    bracketed = [c for c in choices if f"({c})" in text]
    candidates = bracketed or [c for c in choices if f"{c} " in text] or [c for c in choices if f"{c}." in text]
    by_letter = bool(candidates)
    candidates = candidates or _mentioned_options(text, choices, options)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        positions = [text.lower().rfind(options[choices.index(c)].lower()) for c in candidates]
    elif bracketed:
        positions = [text.rfind(f"({c})") for c in candidates]
    else:
        positions = [text.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


def first_word_letter(response: str, options: list[str]) -> str | None:
    """PerceptionTest MC (``perceptiontest/val/utils.py: perceptiontest_val_process_results_mc``): the first
    standalone A-D (its regex allows D even with three options; a D then scores wrong)."""
    match = re.search(r"\b([A-D])\b", response.strip())
    return match.group(1) if match else None


_ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is",
                   "the best answer is", "best answer is", "the correct option is", "correct option is",
                   "the best option is", "best option is", "the choice is", "choice is", "the correct choice is",
                   "correct choice is", "i choose", "i select", "i pick", "my answer is", "my choice is",
                   "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def mcq_extract(response: str, options: list[str], choices: str = "ABCD") -> str | None:
    """VideoMME (``videomme/utils.py: extract_characters_regex`` -> ``_task_utils/mcq_extract.py:
    extract_mcq_answer`` with choices A-D): candidates in ten formats, the highest-priority format wins, then the
    latest position."""
    if not response or not response.strip():
        return None
    text = _padded(response.strip(), _STRIP + ('"',))
    found = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        found += [(c, text.rfind(pattern.format(c)), fmt) for c in choices if pattern.format(c) in text]
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                      if text.find(c, at + len(phrase)) != -1]
    stripped = text.strip()
    found += [(c, 0, "start") for c in choices
              if stripped.startswith(c) and (len(stripped) == 1 or not stripped[1].isalpha())]
    found += [(c, len(text) - 1, "end") for c in choices
              if stripped.endswith(c) and (len(stripped) == 1 or not stripped[-2].isalpha())]
    if not found:
        found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
    if not found:
        return None
    # Python's sort is stable: among equal (priority, position) keys the first appended wins, as in lmms-eval.
    found.sort(key=lambda x: (_PRIORITY[x[2]], x[1]), reverse=True)
    return found[0][0]


_LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:")


def lvb_first_letter(response: str, options: list[str]) -> str | None:
    """LongVideoBench (``longvideobench/utils.py: parse_multi_choice_response``): answer phrases removed, then the
    first A-E anywhere."""
    text = response.strip()
    for prefix in _LVB_PREFIXES:
        text = text.replace(prefix, "")
    match = re.search(r"[ABCDE]", text)
    return match[0] if match else None


_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _mvbench_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(r"(\d)(\,)(\d)", text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # lmms-eval passes re.UNICODE (32) as the positional `count` of Pattern.sub: at most 32 periods go.
    return _PERIOD.sub("", out, 32)


def mvbench_normalize(answer: str) -> str:
    """MVBench (``mvbench/utils.py: mcq_acc.process``): "X. text" -> X; else punctuation removed, lower-cased, and
    the first standalone a-e upper-cased; else the cleaned text itself."""
    match = re.match(r"^([A-E])\.\s*(.+)$", answer.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _mvbench_punctuation(text).strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
    return letter.group(1).upper() if letter else text


def mvbench_letter(response: str, options: list[str]) -> str | None:
    """The letter :func:`mvbench_normalize` reads, or None when it reads none (lmms-eval then compares the cleaned
    text with the GT letter, which can never match)."""
    value = mvbench_normalize(response)
    return value if len(value) == 1 and value in LETTERS[: 5] else None


PARSERS = {"mmmu_first": mmmu_first, "mmmu_last": mmmu_last, "first_word_letter": first_word_letter,
           "mcq_extract": mcq_extract, "lvb_first_letter": lvb_first_letter, "mvbench": mvbench_letter}
