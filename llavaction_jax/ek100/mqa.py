"""The EK100-MQA question file that ``build-mqa`` (build_mqa.py) writes (upstream: llavaction/action/utils.py:
AvionMultiChoiceGenerator, RandomMultiChoiceGenerator, used by llavaction/action/ek_eval.py: evaluate_on_EK100).

Upstream re-derives its questions at evaluation time from one global RNG stream, so the benchmark instance depends on
the number of processes and on the order in which they consume the stream (``random.seed(42)`` at import of
llavaction/action/utils.py, one stream per rank in ek_eval.py: evaluate_on_EK100). We build the questions once and
store them. Each question draws from its own generator, ``np.random.default_rng([seed, sha256(uid)])``
(:func:`labels.item_rng`): the file is a function of the seed and the inputs only, whatever the slicing. This is a
deliberate difference from upstream, and it comes with two fixes of upstream bugs (utils.py:
RandomMultiChoiceGenerator): random distractors never include the ground truth (upstream's may, giving the GT
twice), and no two options of a question show the same text (``--no-distinct-options`` turns that off).

Two protocols (``--protocol``):

* ``mqa``: EPIC-KITCHENS-100-MQA, the benchmark: k = 5 options (random or an action model's top-5), the GT put in
  place of the 5th prediction when the top-5 misses it (upstream's ``--benchmark_testing``);
* ``recognition``: action recognition on the EK100 validation set: the action model's top-k (20 in the paper's
  state-of-the-art claim) as they are, a clip whose GT is not among them counts wrong (upstream's ek_eval without
  ``--benchmark_testing``, its default).

Test types (``--test-type``, upstream's ``--test_type``): ``mc`` (``base``), ``direct_narration`` (free text, scored
by exact match against the GT text), ``caption_then_answer`` (two passes, run by ``eval``); and prior actions
(``--prior-actions oracle | pseudo``: ``temporal_cot_oracle | temporal_cot_pseudo``, see prior_actions.py).

Output: a JSONL file with one question per line (schema in :func:`build_question`) and a sidecar
``<output>.meta.json`` with the seed, the settings, the inputs and the counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from llavaction_jax.ek100 import labels, prior_actions, prompts

SCHEMA_VERSION = 1
DISTRACTOR_SOURCES = ("random", "avion", "tim")
PROTOCOLS = {"mqa": {"n_options": 5, "benchmark_testing": True},  # EPIC-KITCHENS-100-MQA
             "recognition": {"n_options": 20, "benchmark_testing": False}}  # top-k as is, GT not inserted
TEST_TYPES = ("mc", "direct_narration", "caption_then_answer")


@dataclasses.dataclass(frozen=True)
class MQASettings:
    n_options: int = 5  # upstream's topk_predictions
    distractors: str = "random"  # random | avion | tim (the last two read a prediction file)
    benchmark_testing: bool = True  # insert the GT in place of the last prediction when the top-k misses it
    representation: str = "GT_random_narration"
    perspective: str = "first_person"
    include_time_instruction: bool = False  # upstream's ek_eval default; LLaVAction's own training eval used True
    n_frames: int = 16  # frames the model sees; only used by the time instruction
    seed: int = 42
    distinct_options: bool = True
    n_narrations: int = -1  # topk_narration_cut_key: narrations shown per option
    test_type: str = "mc"  # TEST_TYPES
    prior_actions: str = "none"  # prior_actions.MODES

    @property
    def protocol(self) -> str:
        """``mqa`` when every question has its GT among the options, else ``recognition``."""
        return "mqa" if self.benchmark_testing or self.distractors == "random" else "recognition"

    def __post_init__(self):
        if not 2 <= self.n_options <= len(prompts.LETTERS):
            raise ValueError(f"n_options must be in [2, {len(prompts.LETTERS)}], got {self.n_options}")
        if self.distractors not in DISTRACTOR_SOURCES:
            raise ValueError(f"distractors must be one of {DISTRACTOR_SOURCES}, got {self.distractors!r}")
        if self.representation not in labels.REPRESENTATIONS:
            raise ValueError(f"representation must be one of {labels.REPRESENTATIONS}, got {self.representation!r}")
        prompts.perspective_prefix(self.perspective)  # validates
        if self.representation == "topk_narration_cut_key" and self.n_narrations <= 0:
            raise ValueError("--representation topk_narration_cut_key needs --n-narrations > 0")
        if self.test_type not in TEST_TYPES:
            raise ValueError(f"test_type must be one of {TEST_TYPES}, got {self.test_type!r}")
        if self.prior_actions not in prior_actions.MODES:
            raise ValueError(f"prior_actions must be one of {prior_actions.MODES}, got {self.prior_actions!r}")
        if self.prior_actions != "none" and self.test_type != "mc":
            raise ValueError("prior actions go with the mc test type (upstream's temporal_cot_* prompts are MC)")


def random_distractors(gt_vn: str, maps: labels.LabelMaps, k: int, rng) -> list[str]:
    """``k - 1`` distinct actions drawn uniformly from the label space, excluding the GT."""
    actions = maps.actions
    if k > len(actions):
        raise ValueError(f"{k} options asked for, but the label space has only {len(actions)} actions")
    gt_index = maps.vn2act[gt_vn]
    picks = rng.choice(len(actions) - 1, size=k - 1, replace=False)
    return [actions[i + (i >= gt_index)] for i in picks]  # skip over the GT's slot


def benchmark_answer_ids(gt_vn: str, ranked: list[str], k: int, benchmark_testing: bool) -> list[str]:
    """Upstream's ``test_generate`` choice: the top-k, with the GT replacing the k-th when missing (if enabled)."""
    answer_ids = list(ranked[:k])
    if benchmark_testing and gt_vn not in answer_ids:
        answer_ids[-1] = gt_vn
    return answer_ids


def render_options(answer_ids: list[str], segment: labels.Segment, maps: labels.LabelMaps, representation: str,
                   distinct: bool, rng, n_narrations: int = -1) -> tuple[dict[str, str], str]:
    """(text of every answer id, GT text). The GT is rendered first, even when it is not an option, so that with
    ``distinct`` no distractor shows its text (a question without the GT then has truly no right option)."""
    gt_text = labels.render_action(segment.vn, representation, maps, rng, segment.vn, segment.narration,
                                   n_narrations=n_narrations)
    texts = {segment.vn: gt_text} if segment.vn in answer_ids else {}
    taken = {gt_text}
    for vn in answer_ids:
        if vn != segment.vn:
            texts[vn] = labels.render_action(vn, representation, maps, rng, segment.vn, segment.narration,
                                             taken if distinct else frozenset(), n_narrations)
            taken.add(texts[vn])
    if distinct and len(taken) < len(answer_ids) + (segment.vn not in answer_ids):
        raise labels.AnnotationError(f"uid {segment.narration_id}: cannot render distinct option texts for actions "
                                     f"{answer_ids} (GT {segment.vn}); --no-distinct-options keeps upstream's "
                                     "repeated texts")
    return texts, gt_text


def question_prompt(options: list[str], duration: float, settings: MQASettings, prior: dict | None = None) -> str:
    """The user message after ``"<image>\\n"`` (upstream's ``format_llava_prompt``): the time instruction if on,
    then the task prompt of the test type; an MC question with prior actions gets the prior-actions prompt
    (``temporal_cot_*``). For ``caption_then_answer`` this is the second pass's MC prompt."""
    if settings.test_type == "direct_narration":
        task = prompts.direct_narration_prompt(settings.perspective)
    elif prior is not None:
        task = prompts.mc_prior_actions_prompt(options, prior, settings.perspective)
    else:
        task = prompts.mc_prompt(options, settings.perspective)
    user = prompts.user_message(task, duration, settings.n_frames, settings.include_time_instruction)
    return user[len(prompts.IMAGE_TOKEN) + 1:]


def caption_prompt() -> str:
    """The first pass of ``caption_then_answer``: upstream calls ``llava_inference`` again with
    ``test_type='caption'`` and the defaults for everything else, so first person and no time instruction."""
    return prompts.caption_prompt("first_person")


def build_question(segment: labels.Segment, maps: labels.LabelMaps, settings: MQASettings,
                   ranked: list[str] | None = None, prior: dict | None = None) -> dict:
    """One question record (a line of the question file).

    Keys: uid (narration_id), row_index (CSV data row, the prediction-file key), video ("P01-P01_11"),
    participant_id, video_id, start / end (seconds, rounded to 2 decimals like upstream's eval dataset), narration,
    options (lettered, in order), option_vns (the "v:n" behind each option), gt_letter (None only when
    benchmark_testing is off and the top-k misses the GT), gt_text, gt_vn, verb_id, noun_id, action_id, source
    (random / avion / tim), top1_text / top1_vn (the action model's top-1, rendered; None for random), test_type,
    prior_actions (the two previous actions named in the prompt, or None), caption_prompt (caption_then_answer's
    first pass), and prompt:
    the user message after "<image>\\n" (time instruction, if on, + task prompt), byte for byte.
    """
    rng = labels.item_rng(settings.seed, segment.narration_id)
    k = settings.n_options
    if ranked is None:
        answer_ids = [segment.vn] + random_distractors(segment.vn, maps, k, rng)
    else:
        answer_ids = benchmark_answer_ids(segment.vn, ranked, k, settings.benchmark_testing)
        if len(set(answer_ids)) < k:
            raise labels.AnnotationError(f"uid {segment.narration_id} (row {segment.row_index}): the top-{k} "
                                        f"predictions repeat an action: {answer_ids}")
    texts, gt_text = render_options(answer_ids, segment, maps, settings.representation, settings.distinct_options,
                                    rng, settings.n_narrations)
    order = [answer_ids[i] for i in rng.permutation(k)]
    options = prompts.letter_options([texts[vn] for vn in order])
    start, end = round(segment.start, 2), round(segment.end, 2)
    return {
        "uid": segment.narration_id,
        "row_index": segment.row_index,
        "video": segment.video,
        "participant_id": segment.participant_id,
        "video_id": segment.video_id,
        "start": start,
        "end": end,
        "narration": segment.narration,
        "options": options,
        "option_vns": order,
        "gt_letter": prompts.LETTERS[order.index(segment.vn)] if segment.vn in order else None,
        "gt_text": gt_text,
        "gt_vn": segment.vn,
        "verb_id": segment.verb_class,
        "noun_id": segment.noun_class,
        "action_id": maps.vn2act[segment.vn],
        "source": settings.distractors,
        "top1_text": texts[answer_ids[0]] if ranked is not None else None,
        "top1_vn": answer_ids[0] if ranked is not None else None,
        "test_type": settings.test_type,
        "prior_actions": prior,
        **({"caption_prompt": caption_prompt()} if settings.test_type == "caption_then_answer" else {}),
        "prompt": question_prompt(options, end - start, settings, prior),
    }


def with_prior(question: dict, prior: dict, settings: MQASettings) -> dict:
    """``question`` with other prior actions (pseudo: the model's earlier answers) and its prompt rebuilt."""
    return {**question, "prior_actions": prior,
            "prompt": question_prompt(question["options"], question["end"] - question["start"], settings, prior)}


def slice_bounds(n_items: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of process ``process_index``: the parts, concatenated in order, are the whole."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    return n_items * process_index // num_processes, n_items * (process_index + 1) // num_processes


def build_questions(segments, maps, settings: MQASettings, predictions=None, predictions_path: str = "",
                    progress=None, prior_table: dict | None = None, pseudo=None):
    """Yield the question of every segment; ``predictions`` (from :func:`labels.load_predictions`) for avion/tim;
    ``prior_table`` (:func:`prior_actions.oracle_table` of the whole CSV) for prior actions, with ``pseudo``
    (:class:`prior_actions.PseudoPredictions`) replacing the previous actions' texts by an earlier run's answers."""
    if (settings.distractors == "random") != (predictions is None):
        raise ValueError(f"distractors={settings.distractors!r} needs predictions exactly when it is not 'random'")
    if (settings.prior_actions != "none") != (prior_table is not None) or (settings.prior_actions == "pseudo") != (
            pseudo is not None):
        raise ValueError(f"prior_actions={settings.prior_actions!r} needs the prior-action table (and, for pseudo, "
                         "the earlier predictions) exactly when it is not 'none'")
    for i, segment in enumerate(segments):
        ranked = None
        if predictions is not None:
            ranked = labels.predictions_for(segment, predictions, predictions_path, settings.n_options)
        prior = prior_actions.lookup(prior_table, segment) if prior_table is not None else None
        if prior is not None and pseudo is not None:
            prior = prior_actions.with_pseudo(prior, pseudo, segment.narration_id)
        yield build_question(segment, maps, settings, ranked, prior)
        if progress:
            progress(i + 1)


def meta_path(output: str | pathlib.Path) -> pathlib.Path:
    output = pathlib.Path(output)
    return output.with_name(output.name + ".meta.json")


def read_question_file(path: str | pathlib.Path) -> tuple[dict | None, list[dict]]:
    """(meta or None, questions) of a question file written by ``build-mqa``."""
    path = pathlib.Path(path)
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                questions.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not a JSON question ({e})") from None
    meta = json.loads(meta_path(path).read_text()) if meta_path(path).exists() else None
    return meta, questions


def write_question_file(path: str | pathlib.Path, questions: list[dict], meta: dict | None) -> None:
    """Write questions (JSONL) and, unless None, the sidecar meta; each replaces its file at once, so a crash
    mid-write leaves the previous file (if any) intact rather than a truncated one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, (json.dumps(q, ensure_ascii=False) for q in questions))
    if meta is not None:
        _write_atomically(meta_path(path), [json.dumps(meta, indent=1)])


def _write_atomically(path: pathlib.Path, lines) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # one per process: several may write the same file
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)
