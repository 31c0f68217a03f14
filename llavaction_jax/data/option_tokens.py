"""The scored continuations of multiple-choice options (model/decode.score_options): their token ids and their
padded batch layout, shared by `eval` and the Python API.

The continuation of option ``"C. open door"`` is the ids of that text as the model answers it, then the
``<|im_end|>`` id: the assistant turn of an EK100 MQA training sample (llavaction/train/train.py:
preprocess_qwen). Tokenizing the option on its own gives the same ids as tokenizing prompt + option together,
because Qwen2's pre-tokenizer never merges the prompt's final ``"\\n"`` into the next word (tests/test_scoring.py).
"""

from __future__ import annotations

import math

import numpy as np


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple (at least one): padded lengths that let similar batches share a program."""
    return max(multiple, math.ceil(n / multiple) * multiple)


def option_token_ids(tokenizer, options: list[str], end_id: int) -> list[list[int]]:
    """The scored continuation of every option: ids of the option text as the model answers it, then ``end_id``
    (``<|im_end|>``)."""
    encoded = tokenizer(list(options), add_special_tokens=False)["input_ids"]
    return [list(ids) + [end_id] for ids in encoded]


def pad_options(per_question: list[list[list[int]]], num_options: int,
                max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged option ids -> (ids int32 (B, K, M), mask bool (B, K, M)); a question with fewer than K options gets
    all-False rows (scored -inf). Raises if an option is longer than M tokens."""
    ids = np.zeros((len(per_question), num_options, max_tokens), np.int32)
    mask = np.zeros(ids.shape, bool)
    for b, options in enumerate(per_question):
        if len(options) > num_options:
            raise ValueError(f"question {b} has {len(options)} options, the batch layout holds {num_options}")
        for k, tokens in enumerate(options):
            if len(tokens) > max_tokens:
                raise ValueError(f"option {k} of question {b} has {len(tokens)} tokens, more than {max_tokens}")
            ids[b, k, : len(tokens)], mask[b, k, : len(tokens)] = tokens, True
    return ids, mask
