"""Answer parsing (upstream's process_raw_pred + rstrip(',')) and scoring, llavaction/action/ek_eval.py."""

import pytest

from llavaction_jax.eval.parsing import answer_letter, parse_answer, process_raw_pred, score_answer

OPTIONS = ["A. open door", "B. close door", "C. take cup", "D. open drawer", "E. wash hands"]


@pytest.mark.parametrize("raw, expected", [
    # worked examples of upstream's process_raw_pred
    ("C. take cup.", "take cup"),
    ("B. pick up knife. The person is holding a knife.", "pick up knife"),
    ("I think the answer is D. open drawer", "open drawer"),
    ("open door", "open door"),
    # one match per line, the last one wins
    ("A. open door\nB. close door", "close door"),
    # "None" is handled before the lettered answers and returns the whole text
    ("None. A. open door", "A. open door"),
    ("None of the options", "None of the options"),
    # "X. " needs the space; a letter inside a word does not count
    ("Answer:C.take cup", "Answer:C.take cup"),
])
def test_process_raw_pred(raw, expected):
    assert process_raw_pred(raw) == expected


def test_trailing_commas_are_stripped_before_parsing():
    assert process_raw_pred("A. open door,") == "open door,"
    assert parse_answer("A. open door,") == "open door"
    assert parse_answer("A. open door,,") == "open door"
    assert parse_answer("take cup,") == "take cup"


@pytest.mark.parametrize("raw, letter", [
    ("C. take cup.", "C"), ("I think the answer is D. open drawer", "D"), ("B", "B"), ("(B)", "B"), ("E.", "E"),
    ("take cup", "C"),  # no letter: the option whose text equals the parsed answer
    ("pick up cup", None), ("Z. something", None), ("F", None),  # not an option of this question
])
def test_answer_letter(raw, letter):
    assert answer_letter(raw, OPTIONS) == letter


def test_scoring_by_text_and_by_letter():
    right = score_answer("C. take cup.", OPTIONS, "C", "take cup")
    assert right == {"parsed": "take cup", "letter": "C", "correct_text": True, "correct_letter": True}
    # a bare letter is right by letter but not by upstream's exact-text metric
    bare = score_answer("C", OPTIONS, "C", "take cup")
    assert (bare["correct_text"], bare["correct_letter"]) == (False, True)
    # right letter, wrong text (the model rephrased): upstream counts it wrong
    rephrased = score_answer("C. take the cup", OPTIONS, "C", "take cup")
    assert (rephrased["correct_text"], rephrased["correct_letter"]) == (False, True)
    wrong = score_answer("A. open door", OPTIONS, "C", "take cup")
    assert (wrong["correct_text"], wrong["correct_letter"]) == (False, False)
    # a question without its GT among the options (benchmark_testing off) can never be right by letter
    assert score_answer("C. take cup", OPTIONS, None, "take cup")["correct_letter"] is False
