"""``build-mqa``: the EK100-MQA question file from annotation CSVs (question building: mqa.py; prior actions:
prior_actions.py)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from llavaction_jax import cli_flags
from llavaction_jax.ek100 import labels, prior_actions, prompts
from llavaction_jax.progress import Progress
from llavaction_jax.ek100.mqa import (DISTRACTOR_SOURCES, PROTOCOLS, SCHEMA_VERSION, TEST_TYPES, MQASettings,
                                      build_questions, meta_path, slice_bounds, write_question_file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build an EK100-MQA question file (JSONL, one question per line) and its sidecar <output>.meta.json. Every "
        "question draws from its own RNG derived from (seed, uid), so the file is identical however many processes "
        "build it (unlike upstream, whose instance depends on its RNG stream).")
    a = parser.add_argument
    a("--annotations", required=True, type=pathlib.Path,
      help="folder of the EPIC-KITCHENS-100 annotation CSVs (class CSVs and, by default, train/validation CSVs)")
    cli_flags.add_out(parser, "question file to write (JSONL); give each process its own", type=pathlib.Path)
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
    a("--protocol", choices=sorted(PROTOCOLS), default=None,
      help="mqa: EPIC-KITCHENS-100-MQA, 5 options with the GT always among them (inserted in place of the 5th "
           "prediction when missing); recognition: an action model's top-k (default 20) as they are, a clip whose "
           "GT is not among them counts wrong (the paper's action-recognition comparison; upstream's ek_eval "
           "default). Sets the defaults of --n-options and --benchmark-testing (default: mqa's)")
    a("--n-options", type=int, default=None, help="options per question (k), at most 26 (default: the protocol's)")
    a("--benchmark-testing", action=argparse.BooleanOptionalAction, default=None,
      help="with predictions: put the GT in place of the k-th prediction when the top-k misses it (default: on for "
           "--protocol mqa, off for recognition)")
    a("--representation", choices=labels.REPRESENTATIONS, default="GT_random_narration",
      help="option text: GT_random_narration = GT's own narration and a random real narration per distractor; "
           "official_key = 'verb_key noun_key'; GT_key = keys, the GT as its narration; topk_narration_cut_key = "
           "key + 'example usages could be' + the --n-narrations most frequent narrations")
    a("--n-narrations", type=int, default=-1, help="topk_narration_cut_key: narrations per option")
    a("--test-type", choices=TEST_TYPES, default="mc",
      help="mc: the multiple-choice prompt (upstream's base); direct_narration: 'What action are you performing?', "
           "free text scored by exact match with the GT text; caption_then_answer: eval runs a caption pass, then "
           "the MC prompt behind the caption (upstream's test types of the same names)")
    a("--prior-actions", choices=prior_actions.MODES, default="none",
      help="name the two previous actions of the video in the prompt: oracle = their annotations "
           "(temporal_cot_oracle), pseudo = the model's answers for them in an earlier eval run "
           "(temporal_cot_pseudo, needs --pseudo-predictions)")
    a("--pseudo-predictions", type=pathlib.Path, default=None,
      help="predictions.jsonl of an earlier eval of the same questions without prior actions (or a folder of "
           "upstream's prediction*.json)")
    a("--perspective", choices=sorted(prompts.PERSPECTIVES), default="first_person", help="prompt perspective")
    a("--time-instruction", action=argparse.BooleanOptionalAction, default=False,
      help="prepend 'The provided video lasts for D seconds, and N frames are uniformly sampled from it.'")
    cli_flags.add_num_frames(parser, "the count N stated in the time instruction", default=16)
    a("--seed", type=int, default=42, help="seed of every question's RNG")
    a("--distinct-options", action=argparse.BooleanOptionalAction, default=True,
      help="never show the same option text twice in a question (upstream can)")
    a("--num-processes", type=int, default=1, help="build only a contiguous 1/N slice of the questions ...")
    a("--process-id", type=int, default=0, metavar="I",
      help="... namely slice number I (0-based); concatenating the slices' files in order gives the single-process "
           "file")


def protocol_defaults(args: argparse.Namespace) -> tuple[int, bool]:
    """(n_options, benchmark_testing) from --protocol and the explicit flags; a flag that contradicts the named
    protocol is an error."""
    protocol = PROTOCOLS[args.protocol or "mqa"]
    if args.protocol == "recognition" and args.distractors == "random":
        raise ValueError("--protocol recognition ranks an action model's predictions: give --distractors avion|tim "
                         "and --predictions")
    if args.protocol and args.benchmark_testing is not None and args.benchmark_testing != protocol[
            "benchmark_testing"]:
        raise ValueError(f"--protocol {args.protocol} {'always' if protocol['benchmark_testing'] else 'never'} "
                         "inserts the GT; drop --(no-)benchmark-testing or the protocol")
    n_options = protocol["n_options"] if args.n_options is None else args.n_options
    testing = protocol["benchmark_testing"] if args.benchmark_testing is None else args.benchmark_testing
    return n_options, testing


def run(args: argparse.Namespace) -> int:
    n_options, benchmark_testing = protocol_defaults(args)
    settings = MQASettings(n_options, args.distractors, benchmark_testing, args.representation,
                           args.perspective, args.time_instruction, args.num_frames, args.seed, args.distinct_options,
                           args.n_narrations, args.test_type, args.prior_actions)
    if (args.distractors == "random") != (args.predictions is None):
        raise ValueError(f"--distractors {args.distractors} {'takes no' if args.distractors == 'random' else 'needs'}"
                         " --predictions")
    if (args.prior_actions == "pseudo") != (args.pseudo_predictions is not None):
        raise ValueError("--pseudo-predictions goes with --prior-actions pseudo (and it needs one)")
    validation_csv = args.validation_csv or args.annotations / labels.VALIDATION_CSV
    train_csvs = args.train_csv or labels.default_train_csvs(args.annotations, args.label_space)
    maps = labels.load_label_maps(args.annotations, train_csvs, validation_csv)
    segments = labels.read_annotation_csv(validation_csv)
    _check_unique_uids(segments)
    start, stop = slice_bounds(len(segments), args.process_id, args.num_processes)
    predictions = labels.load_predictions(args.predictions) if args.predictions else None
    prior_table = None  # from the whole CSV, whatever this process's slice
    if settings.prior_actions != "none":
        prior_table = prior_actions.oracle_table(segments, maps, settings.representation)
    pseudo = prior_actions.PseudoPredictions(args.pseudo_predictions) if args.pseudo_predictions else None
    bar = Progress(stop - start, "[build-mqa]", "questions")
    questions = list(build_questions(segments[start:stop], maps, settings, predictions, str(args.predictions or ""),
                                     lambda done: bar.update(), prior_table, pseudo))
    bar.close()
    outside = sum(vn not in maps.vn2narrations for q in questions for vn in q["option_vns"])
    counts = {"questions": len(questions), "with_gt": sum(q["gt_letter"] is not None for q in questions),
              "with_prior_actions": sum(q["prior_actions"] is not None for q in questions),
              "options_outside_label_maps": outside}
    meta = {"format": "llavaction_jax.ek100_mqa", "schema_version": SCHEMA_VERSION,
            "settings": {**dataclasses.asdict(settings), "protocol": settings.protocol},
            "rng": "numpy.random.default_rng([seed, first 8 bytes of sha256(uid) as little-endian uint64])",
            "inputs": {"validation_csv": str(validation_csv), "train_csvs": [str(p) for p in train_csvs],
                       "predictions": str(args.predictions) if args.predictions else None,
                       "pseudo_predictions": str(args.pseudo_predictions) if args.pseudo_predictions else None},
            "label_space": {"name": "custom" if args.train_csv else args.label_space, "actions": len(maps.vn2act),
                            "verbs": len(maps.verb_keys), "nouns": len(maps.noun_keys)},
            "slice": {"process_index": args.process_id, "num_processes": args.num_processes,
                      "rows": [start, stop], "total_rows": len(segments)},
            "counts": counts}
    write_question_file(args.out, questions, meta)
    prior = (f", {counts['with_prior_actions']} with {settings.prior_actions} prior actions"
             if settings.prior_actions != "none" else "")
    print(f"[build-mqa] wrote {counts['questions']} questions (protocol {settings.protocol}, {settings.test_type}, "
          f"{settings.n_options} options, {settings.distractors} distractors, {settings.representation}), "
          f"{counts['with_gt']} with the GT among the options{prior}, label space "
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
