"""Prompt strings byte for byte (upstream llavaction/action/utils.py: format_llava_prompt,
llavaction/train/train.py: LazySupervisedDataset._get_item); every expected string is typed out here."""

import numpy as np
import pytest

from llavaction_jax.data.chat import build_inference_prompt, llava_video_time_prompt
from llavaction_jax.ek100 import prompts

ANSWERS = ["open door", "close door", "take cup", "open cupboard", "wash hands"]
OPTIONS_TEXT = "A. open door, B. close door, C. take cup, D. open cupboard, E. wash hands"

SPEC_PROMPT_1_03S = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nThe provided video lasts "
    "for 1.030 seconds, and 16 frames are uniformly sampled from it.You are seeing this video from egocentric view and "
    "you are the person. Your hands are sometimes interacting with objects. What action are you doing? Given multiple "
    "choices, format your answer briefly such as 'A. move knife'. \nHere are the options of actions you are selecting:"
    "\nA. open door, B. close door, C. take cup, D. open cupboard, E. wash hands<|im_end|>\n<|im_start|>assistant\n")


def test_spec_prompt_for_a_1_03_second_clip():
    options = prompts.letter_options(ANSWERS)
    user = prompts.user_message(prompts.mc_prompt(options, "first_person"), 1.03, 16, include_time_instruction=True)
    assert build_inference_prompt(user) == SPEC_PROMPT_1_03S


def test_without_time_instruction_the_sentence_is_absent():
    options = prompts.letter_options(ANSWERS)
    user = prompts.user_message(prompts.mc_prompt(options), 1.03, 16, include_time_instruction=False)
    assert user == ("<image>\nYou are seeing this video from egocentric view and you are the person. Your hands are "
                    "sometimes interacting with objects. What action are you doing? Given multiple choices, format "
                    "your answer briefly such as 'A. move knife'. \nHere are the options of actions you are selecting:"
                    "\nA. open door, B. close door, C. take cup, D. open cupboard, E. wash hands")
    with pytest.raises(ValueError, match="duration"):
        prompts.user_message("task", include_time_instruction=True)


def test_third_person_prefix_has_no_trailing_space():
    assert prompts.mc_prompt(prompts.letter_options(ANSWERS), "third_person") == (
        "The video is taken from egocentric view. The person's hands are sometimes interacting with objects. What "
        "action is the person doing?Given multiple choices, format your answer briefly such as 'A. move knife'. \n"
        "Here are the options of actions you are selecting:\n" + OPTIONS_TEXT)
    with pytest.raises(ValueError, match="perspective"):
        prompts.perspective_prefix("second_person")


def test_time_instruction_and_options():
    assert prompts.time_instruction(1.03, 16) == (
        "The provided video lasts for 1.030 seconds, and 16 frames are uniformly sampled from it.")
    assert prompts.time_instruction(12.3456, 64) == (
        "The provided video lasts for 12.346 seconds, and 64 frames are uniformly sampled from it.")
    assert ", ".join(prompts.letter_options(ANSWERS)) == OPTIONS_TEXT
    assert prompts.letter_options(["x"] * 26)[-1] == "Z. x"
    with pytest.raises(ValueError, match="27 options"):
        prompts.letter_options(["x"] * 27)


def test_direct_narration_caption_open_ended():
    assert prompts.direct_narration_prompt("first_person") == (
        "You are seeing this video from egocentric view and you are the person. Your hands are sometimes interacting "
        "with objects. What action are you doing?  What action are you performing? Give a short sentence such as "
        "'move knife'.")
    assert prompts.direct_narration_prompt("third_person") == (
        "The video is taken from egocentric view. The person's hands are sometimes interacting with objects. What "
        "action is the person doing? What action are you performing? Give a short sentence such as 'move knife'.")
    assert prompts.caption_prompt("first_person") == (
        "You are seeing this video from egocentric view and you are the person. Your hands are sometimes interacting "
        "with objects. What action are you doing?  Describe in details what you see from the video frames. You must "
        "talk in the first person perspective. Try to focus on what you are doing. ")
    assert prompts.task_prompt(None, "gpt-gt-reason") == prompts.caption_prompt()
    assert prompts.open_ended_prompt("What is in the pan?") == (
        "You are seeing this video from egocentric view and you are the person. What is in the pan?")


def test_prior_actions_prompt():
    prior = {"prev2_offset": 3.0, "prev2_narration": "take cup", "prev1_offset": 1.52, "prev1_narration": "open tap"}
    assert prompts.mc_prior_actions_prompt(["A. x", "B. y"], prior, "first_person") == (
        "You are seeing this video from egocentric view and you are the person. Your hands are sometimes interacting "
        "with objects. What action are you doing? \n3.0 seconds ago, you started an action take cup. 1.52 seconds "
        "ago, you started an action open tap. What action are you currently performing? Here are the options of "
        "actions you can select:\nA. x, B. y")


def test_prior_variant_is_drawn_30_percent_of_the_time():
    prior = {"prev2_offset": 3.0, "prev2_narration": "a", "prev1_offset": 1.0, "prev1_narration": "b"}
    rng = np.random.default_rng(0)
    outputs = [prompts.task_prompt(["A. x"], "mc_GT_random_narration", prior=prior, rng=rng) for _ in range(4000)]
    share = np.mean(["seconds ago" in t for t in outputs])
    assert 0.27 < share < 0.33
    assert "seconds ago" not in prompts.task_prompt(["A. x"], "mc_official_key", prior=None, rng=rng)
    # no rng draw at all without prior metadata (upstream only draws when the other conditions hold)
    state = rng.bit_generator.state
    prompts.task_prompt(["A. x"], "mc_official_key", prior=None, rng=rng)
    assert rng.bit_generator.state == state


def test_temporal_detection_question_is_verbatim():
    question = prompts.temporal_detection_question("open door", "2.5")
    assert question == (
        "The provided video contains an action 'open door' that lasts 2.5 seconds. What is the relative start and end "
        "time of the action in seconds? Format it as 'start_timestamp: end_timestamp' and round to 2 decimal places.")
    assert prompts.task_prompt(question, "temporal_detection") == question
    with pytest.raises(NotImplementedError, match="question_type"):
        prompts.task_prompt(question, "temporal_cot_caption")


def test_llava_video_time_prompt_for_generic_qa():
    assert llava_video_time_prompt("<image>\nWhat is the man doing?", 12.346, 64) == (
        "<image>\nThe video lasts for 12.35 seconds, and 64 frames are uniformly sampled from it. Please answer the "
        "following questions related to this video.\n\nWhat is the man doing?")
    assert llava_video_time_prompt("Why?", 3.0, 8) == (
        "<image>\nThe video lasts for 3.00 seconds, and 8 frames are uniformly sampled from it. Please answer the "
        "following questions related to this video.\nWhy?")
