"""EK100 training samples as LLaVA-style conversations (upstream llavaction/action/utils.py:
AvionMultiChoiceGenerator.train_generate,
llavaction/action/generate_interval_pred.py, llavaction/action/generate_description.py,
llavaction/train/train.py: LazySupervisedDataset._get_item).

Upstream writes the samples in two steps: data generation stores option lists (``generate_description.py``,
``generate_temporal_detection_data.py``), and the training dataset turns them into prompts at load time
(``train.py:1307-1332``). We do both here, so a sample's human turn is the final ``"<image>\\n..."`` text, byte for
byte what upstream's dataset would feed the tokenizer.

Randomness is per sample, never a global stream: distractors, option order, narration draws and detection padding
come from ``item_rng(seed, uid, question_type)``, fixed like upstream's generated JSON; the 30% prior-action coin,
which upstream redraws every time the dataset loads a sample, comes from an RNG that also takes the epoch, so a
caller regenerating per epoch gets upstream's variation and a fixed epoch gives a fixed file.

Sample keys: id (``"{narration_id}-{question_type}"``, unique), narration_id, video (``"P01-P01_01"``), start, end
(seconds of the clip to show), conversations ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]``,
question_type, dataset_name ("EK100"), split ("train"), verb_id, noun_id, action_id.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections import defaultdict

from llavaction_jax.data import ek100, mqa, prompts

TASKS = ("mc", "direct_narration", "temporal_detection")


@dataclasses.dataclass(frozen=True)
class TrainSampleSettings:
    n_options: int = 5  # topk_predictions
    representation: str = "GT_random_narration"  # the final run's; "official_key" is the other one used
    perspective: str = "first_person"
    include_time_instruction: bool = True  # upstream's add_time_instruction default
    n_frames: int = 16  # clip_length (the final LLaVAction run used 64); stated in the time instruction
    prior_actions: bool = False  # learn_neighbor_actions == "prior"
    detection_padding: float = 5.0  # seconds added around a temporal-detection segment in total
    distinct_options: bool = True  # see mqa.py
    seed: int = 0
    epoch: int = 0  # only changes the prior-action coin

    def __post_init__(self):
        mqa.MQASettings(n_options=self.n_options, representation=self.representation,
                        perspective=self.perspective)  # same validation as the benchmark builder


def prior_action_key(video: str, start: float, end: float) -> str:
    """Upstream's lookup key ``f"{video}_{round(start,2)}_{round(end,2)}"`` (Python float repr: ``3.0``)."""
    return f"{video}_{round(start, 2)}_{round(end, 2)}"


def prior_action_table(segments: list[ek100.Segment], maps: ek100.LabelMaps, representation: str,
                       max_gap: float = 3.0) -> dict[str, dict]:
    """Upstream's ``get_lookup_dict``: the two previous actions of every segment that has close predecessors.

    Per video, segments sorted by end time (stable); for each consecutive triple whose gaps (next start - previous
    end) are both at most ``max_gap`` seconds, the third segment's key maps to the first two narrations and their
    start offsets. Narrations are raw (``*narration`` representations) or ``"verb_key noun_key"`` (official_key).
    """
    by_video: dict[str, list[ek100.Segment]] = defaultdict(list)
    for segment in segments:
        by_video[segment.video].append(segment)
    def name(s: ek100.Segment) -> str:
        return maps.key_text(s.vn) if representation == "official_key" else s.narration

    table = {}
    for video, items in by_video.items():
        items = sorted(items, key=lambda s: s.end)
        for prev2, prev1, cur in zip(items, items[1:], items[2:]):
            if prev1.start - prev2.end <= max_gap and cur.start - prev1.end <= max_gap:
                table[prior_action_key(video, cur.start, cur.end)] = {
                    "prev2_narration": name(prev2), "prev2_offset": round(cur.start - prev2.start, 2),
                    "prev1_narration": name(prev1), "prev1_offset": round(cur.start - prev1.start, 2),
                    "cur_narration": name(cur)}
    return table


def train_answer_ids(gt_vn: str, ranked: list[str], k: int, rng) -> list[str]:
    """Upstream's ``train_generate``: top-2k minus the GT, shuffled, k-1 kept, plus the GT.

    Repeated predictions are dropped first (upstream would show them as two options).
    """
    pool = [vn for vn in dict.fromkeys(ranked[:2 * k]) if vn != gt_vn]
    if len(pool) < k - 1:
        raise ek100.AnnotationError(f"{len(pool)} distinct non-GT actions in the top-{2 * k} predictions, need {k - 1}")
    return [gt_vn] + [pool[i] for i in rng.permutation(len(pool))[:k - 1]]


def _sample(segment, maps, question_type, human, gpt, start, end) -> dict:
    return {"id": f"{segment.narration_id}-{question_type}", "narration_id": segment.narration_id,
            "video": segment.video, "start": start, "end": end,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
            "question_type": question_type, "dataset_name": "EK100", "split": "train",
            "verb_id": segment.verb_class, "noun_id": segment.noun_class, "action_id": maps.vn2act[segment.vn]}


def _user(settings: TrainSampleSettings, task: str, start: float, end: float) -> str:
    return prompts.user_message(task, end - start, settings.n_frames, settings.include_time_instruction)


def mc_sample(segment: ek100.Segment, maps: ek100.LabelMaps, settings: TrainSampleSettings,
              ranked: list[str] | None = None, prior: dict | None = None) -> dict:
    """A multiple-choice sample; distractors from ``ranked`` predictions (train rule) or random; gpt = "C. text"."""
    question_type = f"mc_{settings.representation}"
    rng = ek100.item_rng(settings.seed, segment.narration_id, question_type)
    k = settings.n_options
    if ranked is None:
        answer_ids = [segment.vn] + mqa.random_distractors(segment.vn, maps, k, rng)
    else:
        try:
            answer_ids = train_answer_ids(segment.vn, ranked, k, rng)
        except ek100.AnnotationError as e:
            raise ek100.AnnotationError(f"uid {segment.narration_id} (row {segment.row_index}): {e}") from None
    texts, _ = mqa.render_options(answer_ids, segment, maps, settings.representation, settings.distinct_options, rng)
    order = [answer_ids[i] for i in rng.permutation(k)]
    options = prompts.letter_options([texts[vn] for vn in order])
    coin = ek100.item_rng(settings.seed, segment.narration_id, question_type, "prior", settings.epoch)
    task = prompts.task_prompt(options, question_type, settings.perspective, prior if settings.prior_actions else None,
                               coin)
    gpt = options[order.index(segment.vn)]  # "{letter}. {answer}"
    return _sample(segment, maps, question_type, _user(settings, task, segment.start, segment.end), gpt,
                   segment.start, segment.end)


def direct_narration_sample(segment: ek100.Segment, maps: ek100.LabelMaps, settings: TrainSampleSettings) -> dict:
    """Answer with the clip's narration to the direct-narration prompt."""
    task = prompts.direct_narration_prompt(settings.perspective)
    return _sample(segment, maps, "direct_narration", _user(settings, task, segment.start, segment.end),
                   segment.narration, segment.start, segment.end)


def temporal_detection_sample(segment: ek100.Segment, maps: ek100.LabelMaps, settings: TrainSampleSettings) -> dict:
    """Locate the action in a window padded by ``detection_padding`` seconds split at random before/after it.

    Follows ``generate_temporal_detection_data.py``: every time is rounded to 2 decimals and the relative times are
    computed from the rounded values; the answer is "start, end" (a comma, although the question asks for a colon).
    """
    rng = ek100.item_rng(settings.seed, segment.narration_id, "temporal_detection")
    as_text = lambda x: str(round(x, 2))  # noqa: E731 -- upstream's `process`
    before = float(rng.uniform(0, settings.detection_padding))
    window_start = float(as_text(max(0.0, segment.start - before)))
    window_end = float(as_text(segment.end + settings.detection_padding - before))
    rel_start = as_text(float(as_text(segment.start)) - window_start)
    rel_end = as_text(float(as_text(segment.end)) - window_start)
    question = prompts.temporal_detection_question(segment.narration, as_text(segment.end - segment.start))
    task = prompts.task_prompt(question, "temporal_detection", settings.perspective)
    return _sample(segment, maps, "temporal_detection", _user(settings, task, window_start, window_end),
                   f"{rel_start}, {rel_end}", window_start, window_end)


def training_samples(task: str, segments: list[ek100.Segment], maps: ek100.LabelMaps, settings: TrainSampleSettings,
                     predictions: dict | None = None, predictions_path: str = "",
                     prior_table: dict | None = None) -> list[dict]:
    """All samples of one task over ``segments`` (one CSV, when ``predictions`` are keyed by its row indices).

    ``mc`` with ``settings.prior_actions`` uses ``prior_table`` (default: :func:`prior_action_table` of
    ``segments``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "direct_narration":
        return [direct_narration_sample(s, maps, settings) for s in segments]
    if task == "temporal_detection":
        return [temporal_detection_sample(s, maps, settings) for s in segments]
    if settings.prior_actions and prior_table is None:
        prior_table = prior_action_table(segments, maps, settings.representation)
    samples = []
    for s in segments:
        ranked = None
        if predictions is not None:
            ranked = ek100.predictions_for(s, predictions, predictions_path, settings.n_options)
        prior = prior_table.get(prior_action_key(s.video, s.start, s.end)) if prior_table else None
        samples.append(mc_sample(s, maps, settings, ranked, prior))
    return samples


def write_samples_jsonl(samples: list[dict], path: str | pathlib.Path) -> None:
    """One JSON sample per line (upstream's data-mixture YAML points at such files)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
