"""The user prompt of an EK100 training sample, built when the sample is loaded, as upstream's dataset does.

Upstream's EK100 files store a question, not a prompt (train_files.py); ``LazySupervisedDataset._get_item``
(llavaction/train/train.py) turns it into the user message after loading the clip:

* ``ast.literal_eval`` of the human turn, kept when it gives a list (the MC options), else the text as is;
* ``format_llava_prompt`` (llavaction/action/utils.py): ``"<image>\\n"`` + the time instruction with the clip's
  duration (``end_timestamp - start_timestamp``) and the number of frames actually loaded + the task prompt of the
  sample's ``question_type``;
* with ``learn_neighbor_actions == "prior"``, the two previous actions from a lookup table of the train CSV
  (``get_lookup_dict``, keyed ``f"{video}_{round(start, 2)}_{round(end, 2)}"``) turn an MC prompt into the
  prior-actions variant with probability 0.3, redrawn every time the sample is loaded.

Upstream draws that coin from the global ``random`` stream; we draw it from ``item_rng(seed, where the sample was
read (file:line), "prior", epoch)``, so the AVION and TIM copies of a clip toss independent coins, each epoch tosses
again, and a resumed or re-run job sees the same coins.

A sample whose human turn already holds ``<image>`` (a prompt built beforehand) is used as it is.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping

from llavaction_jax.data.mixture import SOURCE_KEY
from llavaction_jax.ek100 import labels, prompts
from llavaction_jax.ek100.prior_actions import prior_action_key, prior_action_table

NEIGHBOR_MODES = ("", "prior")  # upstream's learn_neighbor_actions values used in training


@dataclasses.dataclass(frozen=True)
class EK100PromptSettings:
    """Upstream's data / eval arguments that shape an EK100 training prompt (``add_time_instruction`` is the
    pipeline's, shared with other videos)."""

    perspective: str = "first_person"
    learn_neighbor_actions: str = ""  # "prior": the 30% prior-actions MC prompt (the final run)
    prior_table: Mapping[str, dict] | None = None  # prior_action_table of the train CSV; needed for "prior"
    seed: int = 0

    def __post_init__(self):
        prompts.perspective_prefix(self.perspective)  # validates
        if self.learn_neighbor_actions not in NEIGHBOR_MODES:
            raise ValueError(f"learn_neighbor_actions {self.learn_neighbor_actions!r}; expected one of "
                             f"{NEIGHBOR_MODES}")
        if self.learn_neighbor_actions == "prior" and self.prior_table is None:
            raise ValueError("learn_neighbor_actions='prior' needs the prior-action table of the train CSV")

    # data.train_sample.QuestionPrompts: how the training pipeline asks for EK100 prompts
    def owns(self, sample: Mapping) -> bool:
        return is_ek100(sample)

    def user_prompt(self, sample: Mapping, n_frames: int, include_time_instruction: bool, epoch: int) -> str | None:
        if not needs_prompt(sample):
            return None
        return ek100_user_prompt(sample, n_frames, self, include_time_instruction, epoch)


def load_prior_table(annotation_dir: str, representation: str = "GT_random_narration",
                     label_space: str = "ek100") -> dict[str, dict]:
    """Upstream's train-time lookup (``get_lookup_dict`` of ``EPIC_100_train.csv``): narrations for ``*narration``
    representations, ``"verb_key noun_key"`` for official_key."""
    maps = labels.load_label_maps(annotation_dir, label_space=label_space)
    segments = [s for path in labels.default_train_csvs(annotation_dir, label_space)
                for s in labels.read_annotation_csv(path)]
    return prior_action_table(segments, maps, "official_key" if "official_key" in representation else representation)


def is_ek100(sample: Mapping) -> bool:
    """Upstream's test: the video folder ``video_folder/dataset_name`` contains "EK100"."""
    return "EK100" in str(sample.get("dataset_name", ""))


def needs_prompt(sample: Mapping) -> bool:
    """An EK100 sample whose first turn is upstream's stored question (no ``<image>`` yet)."""
    first = sample["conversations"][0]
    return is_ek100(sample) and prompts.IMAGE_TOKEN not in first.get("value", first.get("content", ""))


def parse_question(text: str):
    """The option list when ``text`` is a Python list literal, else ``text`` (upstream's ``ast.literal_eval`` try)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, list) else text


def ek100_user_prompt(sample: Mapping, n_frames: int, settings: EK100PromptSettings,
                      include_time_instruction: bool = True, epoch: int = 0) -> str:
    """The human turn upstream trains on for this sample; ``n_frames`` is the clip's loaded frame count.

    Raises ValueError (naming the problem) for a sample upstream would drop: unknown question type, an MC question
    that is not an option list, missing times.
    """
    question_type = sample.get("question_type")
    if not isinstance(question_type, str):
        raise ValueError("an EK100 sample needs a 'question_type' string")
    try:
        start, end = float(sample["start_timestamp"]), float(sample["end_timestamp"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("an EK100 sample needs numeric 'start_timestamp' and 'end_timestamp'") from None
    first = sample["conversations"][0]
    question = parse_question(first.get("value", first.get("content", "")))
    if question_type.startswith("mc_") and not isinstance(question, list):
        raise ValueError(f"question_type {question_type!r} needs the human turn to be a Python list of options, "
                         f"got {str(question)[:60]!r}")
    prior = None
    if settings.learn_neighbor_actions == "prior":
        prior = settings.prior_table.get(prior_action_key(str(sample.get("video")), start, end))
    coin = labels.item_rng(settings.seed, str(sample.get(SOURCE_KEY, sample.get("id", ""))), "prior", epoch)
    try:
        task = prompts.task_prompt(question, question_type, settings.perspective, prior, coin)
    except NotImplementedError as error:
        raise ValueError(str(error)) from None
    return prompts.user_message(task, end - start, n_frames, include_time_instruction)
