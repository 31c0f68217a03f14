"""``build-mqa``: the EK100-MQA question file (upstream: llavaction/action/utils.py: AvionMultiChoiceGenerator,
RandomMultiChoiceGenerator, used by llavaction/action/ek_eval.py: evaluate_on_EK100).

Upstream re-derives its questions at evaluation time from one global RNG stream, so the benchmark instance depends on
the number of processes and on the order in which they consume the stream (``random.seed(42)`` at import of
llavaction/action/utils.py, one stream per rank in ek_eval.py: evaluate_on_EK100). We build the questions once and
store them. Each question draws from its own generator, ``np.random.default_rng([seed, sha256(uid)])``
(:func:`labels.item_rng`): the file is a function of the seed and the inputs only, whatever the slicing. This is a
deliberate difference from upstream, and it comes with two fixes of upstream bugs (utils.py:
RandomMultiChoiceGenerator): random distractors never include the ground truth (upstream's may, giving the GT
twice), and no two options of a question show the same text (``--no-distinct-options`` turns that off).

Output: a JSONL file with one question per line (schema in :func:`build_question`) and a sidecar
``<output>.meta.json`` with the seed, the settings, the inputs and the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

from llavaction_jax import cli_flags
from llavaction_jax.ek100 import labels, prompts

SCHEMA_VERSION = 1
DISTRACTOR_SOURCES = ("random", "avion", "tim")


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

    def __post_init__(self):
        if not 2 <= self.n_options <= len(prompts.LETTERS):
            raise ValueError(f"n_options must be in [2, {len(prompts.LETTERS)}], got {self.n_options}")
        if self.distractors not in DISTRACTOR_SOURCES:
            raise ValueError(f"distractors must be one of {DISTRACTOR_SOURCES}, got {self.distractors!r}")
        if self.representation not in labels.REPRESENTATIONS:
            raise ValueError(f"representation must be one of {labels.REPRESENTATIONS}, got {self.representation!r}")
        prompts.perspective_prefix(self.perspective)  # validates


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
                   distinct: bool, rng) -> tuple[dict[str, str], str]:
    """(text of every answer id, GT text). The GT is rendered first, even when it is not an option, so that with
    ``distinct`` no distractor shows its text (a question without the GT then has truly no right option)."""
    gt_text = labels.render_action(segment.vn, representation, maps, rng, segment.vn, segment.narration)
    texts = {segment.vn: gt_text} if segment.vn in answer_ids else {}
    taken = {gt_text}
    for vn in answer_ids:
        if vn != segment.vn:
            texts[vn] = labels.render_action(vn, representation, maps, rng, segment.vn, segment.narration,
                                            taken if distinct else frozenset())
            taken.add(texts[vn])
    if distinct and len(taken) < len(answer_ids) + (segment.vn not in answer_ids):
        raise labels.AnnotationError(f"uid {segment.narration_id}: cannot render distinct option texts for actions "
                                    f"{answer_ids} (GT {segment.vn})")
    return texts, gt_text


def build_question(segment: labels.Segment, maps: labels.LabelMaps, settings: MQASettings,
                   ranked: list[str] | None = None) -> dict:
    """One question record (a line of the question file).

    Keys: uid (narration_id), row_index (CSV data row, the prediction-file key), video ("P01-P01_11"),
    participant_id, video_id, start / end (seconds, rounded to 2 decimals like upstream's eval dataset), narration,
    options (lettered, in order), option_vns (the "v:n" behind each option), gt_letter (None only when
    benchmark_testing is off and the top-k misses the GT), gt_text, gt_vn, verb_id, noun_id, action_id, source
    (random / avion / tim), top1_text / top1_vn (the action model's top-1, rendered; None for random), and prompt:
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
                                    rng)
    order = [answer_ids[i] for i in rng.permutation(k)]
    options = prompts.letter_options([texts[vn] for vn in order])
    start, end = round(segment.start, 2), round(segment.end, 2)
    user = prompts.user_message(prompts.mc_prompt(options, settings.perspective), end - start, settings.n_frames,
                                settings.include_time_instruction)
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
        "prompt": user[len(prompts.IMAGE_TOKEN) + 1:],
    }


def slice_bounds(n_items: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of process ``process_index``: the parts, concatenated in order, are the whole."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    return n_items * process_index // num_processes, n_items * (process_index + 1) // num_processes


def build_questions(segments, maps, settings: MQASettings, predictions=None, predictions_path: str = "",
                    progress=None):
    """Yield the question of every segment; ``predictions`` (from :func:`labels.load_predictions`) for avion/tim."""
    if (settings.distractors == "random") != (predictions is None):
        raise ValueError(f"distractors={settings.distractors!r} needs predictions exactly when it is not 'random'")
    for i, segment in enumerate(segments):
        ranked = None
        if predictions is not None:
            ranked = labels.predictions_for(segment, predictions, predictions_path, settings.n_options)
        yield build_question(segment, maps, settings, ranked)
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


def _write_atomically(path: pathlib.Path, lines) -> None:
    # A crash mid-write leaves the previous file (if any) intact rather than a truncated one.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (
        "Build an EK100-MQA question file (JSONL, one question per line) and its sidecar <output>.meta.json. Every "
        "question draws from its own RNG derived from (seed, uid), so the file is identical however many processes "
        "build it (unlike upstream, whose instance depends on its RNG stream).")
    a = parser.add_argument
    a("--annotations", required=True, type=pathlib.Path,
      help="folder of the EPIC-KITCHENS-100 annotation CSVs (class CSVs and, by default, train/validation CSVs)")
    cli_flags.add_out(parser, "question file to write (JSONL); give each process its own", old=("--output",),
                      type=pathlib.Path)
    a("--validation-csv", type=pathlib.Path, default=None,
      help="CSV the questions are built from (also part of the label maps); "
           "default ANNOTATIONS/EPIC_100_validation.csv")
    a("--train-csv", type=pathlib.Path, action="append", default=None,
      help="train CSV(s) for the label maps (repeatable); default those of --label-space")
    a("--label-space", choices=labels.LABEL_SPACES, default="ek100",
      help="ek100: EPIC_100_train.csv, the released 3806-way action head (refused when missing); uda: the labelled "
           "UDA train files stand in for it (2684 actions: other ids, distractors and options)")
    a("--distractors", choices=DISTRACTOR_SOURCES, default="random",
      help="random: k-1 actions drawn uniformly (never the GT); avion/tim: the top-k of --predictions")
    a("--predictions", type=pathlib.Path, default=None,
      help="AVION/TIM prediction JSON {row index: {predictions: [v:n, ...], target: v:n}} for the validation CSV")
    a("--n-options", type=int, default=5, help="options per question (k), at most 26")
    a("--benchmark-testing", action=argparse.BooleanOptionalAction, default=True,
      help="with predictions: put the GT in place of the k-th prediction when the top-k misses it")
    a("--representation", choices=labels.REPRESENTATIONS, default="GT_random_narration",
      help="option text: GT_random_narration = GT's own narration and a random real narration per distractor; "
           "official_key = 'verb_key noun_key'")
    a("--perspective", choices=sorted(prompts.PERSPECTIVES), default="first_person", help="prompt perspective")
    a("--time-instruction", action=argparse.BooleanOptionalAction, default=False,
      help="prepend 'The provided video lasts for D seconds, and N frames are uniformly sampled from it.'")
    cli_flags.add_num_frames(parser, "frame count N stated in the time instruction", old=("--n-frames",), default=16)
    a("--seed", type=int, default=42, help="seed of every question's RNG")
    a("--distinct-options", action=argparse.BooleanOptionalAction, default=True,
      help="never show the same option text twice in a question (upstream can)")
    a("--num-processes", type=int, default=1, help="build only a contiguous 1/N slice of the questions ...")
    cli_flags.add_flag(parser, "--process-id", old=("--process-index",), type=int, default=0, metavar="I",
                       help="... namely slice number I (0-based); concatenating the slices' files in order gives "
                            "the single-process file")


def run(args: argparse.Namespace) -> int:
    settings = MQASettings(args.n_options, args.distractors, args.benchmark_testing, args.representation,
                           args.perspective, args.time_instruction, args.num_frames, args.seed, args.distinct_options)
    if (args.distractors == "random") != (args.predictions is None):
        raise ValueError(f"--distractors {args.distractors} {'takes no' if args.distractors == 'random' else 'needs'}"
                         " --predictions")
    validation_csv = args.validation_csv or args.annotations / labels.VALIDATION_CSV
    train_csvs = args.train_csv or labels.default_train_csvs(args.annotations, args.label_space)
    maps = labels.load_label_maps(args.annotations, train_csvs, validation_csv)
    segments = labels.read_annotation_csv(validation_csv)
    _check_unique_uids(segments)
    start, stop = slice_bounds(len(segments), args.process_id, args.num_processes)
    predictions = labels.load_predictions(args.predictions) if args.predictions else None
    total = stop - start
    every = max(1, total // 10)

    def progress(done):
        if done % every == 0 or done == total:
            print(f"[build-mqa] {done}/{total} questions", file=sys.stderr, flush=True)

    questions = list(build_questions(segments[start:stop], maps, settings, predictions, str(args.predictions or ""),
                                     progress))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(args.out, (json.dumps(q, ensure_ascii=False) for q in questions))
    outside = sum(vn not in maps.vn2narrations for q in questions for vn in q["option_vns"])
    counts = {"questions": len(questions), "with_gt": sum(q["gt_letter"] is not None for q in questions),
              "options_outside_label_maps": outside}
    meta = {"format": "llavaction_jax.ek100_mqa", "schema_version": SCHEMA_VERSION,
            "settings": dataclasses.asdict(settings),
            "rng": "numpy.random.default_rng([seed, first 8 bytes of sha256(uid) as little-endian uint64])",
            "inputs": {"validation_csv": str(validation_csv), "train_csvs": [str(p) for p in train_csvs],
                       "predictions": str(args.predictions) if args.predictions else None},
            "label_space": {"name": "custom" if args.train_csv else args.label_space, "actions": len(maps.vn2act),
                            "verbs": len(maps.verb_keys), "nouns": len(maps.noun_keys)},
            "slice": {"process_index": args.process_id, "num_processes": args.num_processes,
                      "rows": [start, stop], "total_rows": len(segments)},
            "counts": counts}
    _write_atomically(meta_path(args.out), [json.dumps(meta, indent=1)])
    print(f"[build-mqa] wrote {counts['questions']} questions ({settings.n_options} options, {settings.distractors} "
          f"distractors, {settings.representation}), {counts['with_gt']} with the GT among the options, label space "
          f"{len(maps.vn2act)} actions; {outside} option(s) outside the label maps -> {args.out} "
          f"(+ {meta_path(args.out).name})")
    return 0


def _check_unique_uids(segments) -> None:
    seen = {}
    for s in segments:
        if s.narration_id in seen:
            raise labels.AnnotationError(f"{s.source}: narration_id {s.narration_id!r} appears in data rows "
                                        f"{seen[s.narration_id]} and {s.row_index}; question uids must be unique")
        seen[s.narration_id] = s.row_index
