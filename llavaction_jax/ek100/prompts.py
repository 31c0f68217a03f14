"""Every EK100 prompt string of LLaVAction, byte for byte (upstream llavaction/action/utils.py:
format_llava_prompt, format_time_instruction, format_task_related_prompt; llavaction/train/train.py:
LazySupervisedDataset._get_item; llavaction/action/generate_temporal_detection_data.py).

Upstream's quirks are kept on purpose because the released checkpoints were trained on them:
* the time instruction ends without a space and is glued to the task prompt ("...from it.You are seeing...");
* the first-person prefix ends with a space, the third-person prefix does not ("...doing?Given multiple...");
* direct narration and caption prompts put an extra space after the prefix (double space in first person).

The chat template around the user message (system turn, ChatML) and LLaVA-Video's time instruction for other videos
live in ``data/chat.py``.
"""

from __future__ import annotations

import string

import numpy as np

IMAGE_TOKEN = "<image>"

FIRST_PERSON_PREFIX = ("You are seeing this video from egocentric view and you are the person. Your hands are "
                       "sometimes interacting with objects. What action are you doing? ")
THIRD_PERSON_PREFIX = ("The video is taken from egocentric view. The person's hands are sometimes interacting with "
                       "objects. What action is the person doing?")
PERSPECTIVES = {"first_person": FIRST_PERSON_PREFIX, "third_person": THIRD_PERSON_PREFIX}

MC_INSTRUCTION = "Given multiple choices, format your answer briefly such as 'A. move knife'. "
MC_OPTIONS_HEADER = "Here are the options of actions you are selecting:\n"
# share of training MC prompts that mention the two previous actions (llavaction/action/utils.py:236 @bd9f465)
PRIOR_ACTIONS_PROBABILITY = 0.3

LETTERS = string.ascii_uppercase  # upstream supports at most 26 options


def perspective_prefix(perspective: str) -> str:
    if perspective not in PERSPECTIVES:
        raise ValueError(f"unknown perspective {perspective!r}; expected one of {sorted(PERSPECTIVES)}")
    return PERSPECTIVES[perspective]


def time_instruction(duration: float, n_frames: int) -> str:
    """Upstream's ``format_time_instruction``: 3 decimals, no trailing space."""
    return f"The provided video lasts for {duration:.3f} seconds, and {n_frames} frames are uniformly sampled from it."


def letter_options(answers: list[str]) -> list[str]:
    """``["open door", ...]`` -> ``["A. open door", ...]``."""
    if len(answers) > len(LETTERS):
        raise ValueError(f"{len(answers)} options; at most {len(LETTERS)} can be lettered")
    return [f"{letter}. {answer}" for letter, answer in zip(LETTERS, answers)]


def mc_prompt(options: list[str], perspective: str = "first_person") -> str:
    """The multiple-choice task prompt (``mc_*`` question types); ``options`` are already lettered."""
    return perspective_prefix(perspective) + MC_INSTRUCTION + "\n" + MC_OPTIONS_HEADER + ", ".join(options)


def mc_prior_actions_prompt(options: list[str], prior: dict, perspective: str = "first_person") -> str:
    """The training MC prompt that names the two previous actions (no "Given multiple choices" sentence).

    ``prior`` holds ``prev2_offset``, ``prev2_narration``, ``prev1_offset``, ``prev1_narration``; offsets are the
    rounded floats of upstream's lookup table, printed with Python's ``str`` (``3.0``, ``2.47``).
    """
    return (perspective_prefix(perspective) + "\n"
            + f"{prior['prev2_offset']} seconds ago, you started an action {prior['prev2_narration']}. "
            + f"{prior['prev1_offset']} seconds ago, you started an action {prior['prev1_narration']}. "
            + "What action are you currently performing? Here are the options of actions you can select:\n"
            + ", ".join(options))


def direct_narration_prompt(perspective: str = "first_person") -> str:
    return (f"{perspective_prefix(perspective)} What action are you performing? Give a short sentence such as "
            "'move knife'.")


def caption_prompt(perspective: str = "first_person") -> str:
    """``caption`` / ``gpt-gt-reason`` prompt (note the trailing space)."""
    return (f"{perspective_prefix(perspective)} Describe in details what you see from the video frames. You must talk "
            "in the first person perspective. Try to focus on what you are doing. ")


def caption_then_answer_message(caption: str, answer_prompt: str) -> str:
    """The second pass of upstream's ``caption_then_answer`` test (llavaction/action/llava_inference.py): the first
    pass's caption as notes, *then* ``"<image>\n"`` and the MC prompt (``answer_prompt``, the text that follows the
    placeholder); so the video sits after the notes, as upstream tokenizes it."""
    return (f"You observed the video before and wrote down the notes: {caption}. Now you watch the same video again "
            f"and you can do better. {IMAGE_TOKEN}\n{answer_prompt}")


def open_ended_prompt(question: str) -> str:
    return f"You are seeing this video from egocentric view and you are the person. {question}"


def temporal_detection_question(narration: str, action_duration: str) -> str:
    """Human turn of a temporal-detection sample; ``action_duration`` is upstream's ``str(round(d, 2))``."""
    return (f"The provided video contains an action '{narration}' that lasts {action_duration} seconds. What is the "
            "relative start and end time of the action in seconds? Format it as 'start_timestamp: end_timestamp' and "
            "round to 2 decimal places.")


def task_prompt(question, question_type: str, perspective: str = "first_person", prior: dict | None = None,
                rng: np.random.Generator | None = None) -> str:
    """Upstream's ``format_task_related_prompt`` for the question types LLaVAction trains and evaluates on.

    ``question`` is the lettered option list for ``mc_*`` types and the verbatim question for the others. With
    ``prior`` (prior-action metadata, training only) an MC prompt becomes the prior-actions variant with probability
    0.3, drawn from ``rng`` only when ``prior`` is given, like upstream.
    """
    if question_type.startswith("mc_"):
        if prior and rng is not None and rng.random() < PRIOR_ACTIONS_PROBABILITY:
            return mc_prior_actions_prompt(question, prior, perspective)
        return mc_prompt(question, perspective)
    if question_type == "direct_narration":
        return direct_narration_prompt(perspective)
    if question_type in ("temporal_detection", "gpt-gt-instruct-reason", "gpt-hand-object"):
        return question
    if question_type in ("gpt-gt-reason", "caption"):
        return caption_prompt(perspective)
    if question_type == "open-ended":
        return open_ended_prompt(question)
    raise NotImplementedError(f"question_type {question_type!r} is not supported")


def user_message(task: str, duration: float | None = None, n_frames: int | None = None,
                 include_time_instruction: bool = False) -> str:
    """Upstream's ``format_llava_prompt``: ``"<image>\\n" [+ time instruction] + task`` (no separator between)."""
    if include_time_instruction:
        if duration is None or n_frames is None:
            raise ValueError("the time instruction needs the clip duration and the frame count")
        return f"{IMAGE_TOKEN}\n{time_instruction(duration, n_frames)}{task}"
    return f"{IMAGE_TOKEN}\n{task}"

