"""EK100 training samples in upstream's released layout (llavaction/action/generate_description.py:
generate_train_ann, llavaction/action/generate_temporal_detection_data.py: get_temporal_detection,
llavaction/action/utils.py: AvionMultiChoiceGenerator.train_generate); the prior-action lookup table
(generate_interval_pred.py: get_lookup_dict) is in prior_actions.py.

Upstream writes a sample's *question*, not its prompt: an MC human turn is the Python repr of the lettered option
list (``"['A. open door', 'B. ...']"``), a direct-narration human turn is empty, a temporal-detection human turn is
the bare question; the training dataset builds the prompt when it loads the sample (time instruction with the clip's
real frame count, perspective, the 30% prior-action variant; ``train_prompt.py``). We write the same files, so ours
and upstream's are interchangeable in a data YAML.

Sample keys, in upstream's order: video (``"P01-P01_01"``), conversations, id (= video, as upstream), split,
task_instruction, num_samples, question_type, dataset_name ("EK100"), start_timestamp, end_timestamp (floats; strings
``str(round(x, 2))`` for temporal detection, as upstream), verb_id, noun_id, action_id; plus ``narration_id``, which
upstream's loader ignores and ours uses to find the clip (train_sample.clip_uid).

Randomness: upstream draws everything from one global ``random`` stream, so its files depend on generation order.
Here every (sample, question type, distractor source) has its own stream, ``item_rng(seed, narration_id,
question_type, source)``: the AVION and TIM copies of a clip draw independently (the GT under the same letter in 1
of 5 copies; a stream shared between them correlates the copies).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from llavaction_jax.ek100 import labels, mqa, prompts

TASKS = ("mc", "direct_narration", "temporal_detection")
MC_SOURCES = ("random", "avion", "tim")  # where MC distractors come from


@dataclasses.dataclass(frozen=True)
class TrainSampleSettings:
    n_options: int = 5  # topk_predictions
    representation: str = "GT_random_narration"  # the final run's; "official_key" is the other one used
    detection_padding: float = 5.0  # seconds added around a temporal-detection segment in total
    distinct_options: bool = True  # see mqa.py
    seed: int = 0

    def __post_init__(self):
        mqa.MQASettings(n_options=self.n_options, representation=self.representation)  # same validation


def train_answer_ids(gt_vn: str, ranked: list[str], k: int, rng) -> list[str]:
    """Upstream's ``train_generate``: top-2k minus the GT, shuffled, k-1 kept, plus the GT.

    Repeated predictions are dropped first (upstream would show them as two options).
    """
    pool = [vn for vn in dict.fromkeys(ranked[:2 * k]) if vn != gt_vn]
    if len(pool) < k - 1:
        raise labels.AnnotationError(f"{len(pool)} distinct non-GT actions in the top-{2 * k} predictions, "
                                     f"need {k - 1}")
    return [gt_vn] + [pool[i] for i in rng.permutation(len(pool))[:k - 1]]


def _sample(segment: labels.Segment, maps: labels.LabelMaps, question_type: str, human: str, gpt: str, start,
            end) -> dict:
    return {"video": segment.video, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
            "id": segment.video, "split": "train", "task_instruction": "", "num_samples": 1,
            "question_type": question_type, "dataset_name": "EK100", "start_timestamp": start, "end_timestamp": end,
            "verb_id": segment.verb_class, "noun_id": segment.noun_class, "action_id": maps.vn2act[segment.vn],
            "narration_id": segment.narration_id}


def mc_sample(segment: labels.Segment, maps: labels.LabelMaps, settings: TrainSampleSettings,
              ranked: list[str] | None = None, source: str = "random") -> dict:
    """A multiple-choice sample: human = repr of the lettered options, gpt = ``"C. text"``.

    Distractors from ``ranked`` predictions (upstream's train rule) or, without them, random actions. ``source``
    (random / avion / tim) salts the sample's RNG.
    """
    question_type = f"mc_{settings.representation}"
    rng = labels.item_rng(settings.seed, segment.narration_id, question_type, source)
    k = settings.n_options
    if ranked is None:
        answer_ids = [segment.vn] + mqa.random_distractors(segment.vn, maps, k, rng)
    else:
        try:
            answer_ids = train_answer_ids(segment.vn, ranked, k, rng)
        except labels.AnnotationError as e:
            raise labels.AnnotationError(f"uid {segment.narration_id} (row {segment.row_index}): {e}") from None
    texts, _ = mqa.render_options(answer_ids, segment, maps, settings.representation, settings.distinct_options, rng)
    order = [answer_ids[i] for i in rng.permutation(k)]
    options = prompts.letter_options([texts[vn] for vn in order])
    return _sample(segment, maps, question_type, str(options), options[order.index(segment.vn)], segment.start,
                   segment.end)


def direct_narration_sample(segment: labels.Segment, maps: labels.LabelMaps) -> dict:
    """Empty human turn (the prompt is built at load time), the clip's narration as the answer."""
    return _sample(segment, maps, "direct_narration", "", segment.narration, segment.start, segment.end)


def temporal_detection_sample(segment: labels.Segment, maps: labels.LabelMaps, settings: TrainSampleSettings) -> dict:
    """Locate the action in a window padded by ``detection_padding`` seconds split at random before/after it.

    Follows ``get_temporal_detection``: every time is rounded to 2 decimals and stored as a string, relative times
    are computed from the rounded values; the answer is "start, end" (a comma, although the question asks for a
    colon).
    """
    rng = labels.item_rng(settings.seed, segment.narration_id, "temporal_detection")
    as_text = lambda x: str(round(x, 2))  # noqa: E731 -- upstream's `process`
    before = float(rng.uniform(0, settings.detection_padding))
    window_start = as_text(max(0.0, segment.start - before))
    window_end = as_text(segment.end + settings.detection_padding - before)
    rel_start = as_text(float(as_text(segment.start)) - float(window_start))
    rel_end = as_text(float(as_text(segment.end)) - float(window_start))
    question = prompts.temporal_detection_question(segment.narration, as_text(segment.end - segment.start))
    return _sample(segment, maps, "temporal_detection", question, f"{rel_start}, {rel_end}", window_start,
                   window_end)


def training_samples(task: str, segments: list[labels.Segment], maps: labels.LabelMaps, settings: TrainSampleSettings,
                     predictions: dict | None = None, predictions_path: str = "",
                     source: str | None = None) -> list[dict]:
    """All samples of one task over ``segments`` (one CSV, when ``predictions`` are keyed by its row indices).

    ``source`` names the MC distractor source (default: "random" without predictions, else "avion").
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "direct_narration":
        return [direct_narration_sample(s, maps) for s in segments]
    if task == "temporal_detection":
        return [temporal_detection_sample(s, maps, settings) for s in segments]
    source = source or ("random" if predictions is None else "avion")
    if source not in MC_SOURCES or (source == "random") != (predictions is None):
        raise ValueError(f"MC source {source!r} with{'out' if predictions is None else ''} predictions; expected "
                         "'random' without a prediction file, 'avion' or 'tim' with one")
    samples = []
    for s in segments:
        ranked = None
        if predictions is not None:
            ranked = labels.predictions_for(s, predictions, predictions_path, settings.n_options)
        samples.append(mc_sample(s, maps, settings, ranked, source))
    return samples


def write_samples_jsonl(samples: list[dict], path: str | pathlib.Path) -> None:
    """One JSON sample per line (upstream's data YAML points at such files)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
