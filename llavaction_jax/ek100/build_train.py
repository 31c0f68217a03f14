"""``python -m llavaction_jax build-train``: EK100 training files in upstream's released layout, a data YAML listing
them, and the list of clips to extract.

Upstream generated its EK100 training data with several scripts (llavaction/action/generate_description.py for
MC with AVION / TIM / random distractors and direct narration, generate_temporal_detection_data.py for temporal
detection; the GPT-4o files need GPT-4o and are not built here) and listed them in a data YAML
(scripts/train/avion_tim_top5_gpt4o_detection_direct.yaml). This command writes the same files under the same
folder names, so a YAML can mix ours with upstream's, and ``clips.jsonl`` for ``extract-frames --jsonl``: every
clip the files show (the annotated segment, or the padded window of a temporal-detection sample), uid'd the way the
training pipeline looks them up.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from llavaction_jax import cli_flags
from llavaction_jax.data.mixture import SOURCE_KEY, load_mixture
from llavaction_jax.data.train_sample import clip_uid
from llavaction_jax.ek100 import labels, train_files
from llavaction_jax.ek100.train_prompt import is_ek100

SAMPLES_NAME = "train_convs_narration_actionids.jsonl"  # upstream's file name in each generated folder
YAML_NAME = "data.yaml"
CLIPS_NAME = "clips.jsonl"
LLAVA_VIDEO_CLIPS_NAME = "clips_llava_video.jsonl"  # --clips-for: the other videos (LLaVA-Video-178K)

DESCRIPTION = """\
Write EK100 training files in upstream LLaVAction's layout from the annotation CSVs (and AVION / TIM prediction
files for hard MC distractors), plus a data YAML for `train --config.data.samples` and clips.jsonl for
`extract-frames --jsonl`.

Files (under --out; folder names as upstream's generators):
  avion_mc_top{K}_{REPR}/%(s)s   MC, distractors from --avion predictions (upstream's train rule: the top-2K
                                 minus the GT, shuffled, K-1 kept)
  tim_mc_top{K}_{REPR}/...       the same with --tim predictions (upstream: cross-validated TIM on train)
  random_mc_top{K}_{REPR}/...    MC with random distractors (--random-mc, or when no prediction file is given)
  direct_narration_{REPR}/...    answer with the narration
  temporal_detection.jsonl       find the action in a window padded by 5 s in total
  %(y)s                      datasets: [{json_path, sampling_strategy: all}, ...] in the order above
  %(c)s                    the clips to extract: {uid, video, start, end}

With --clips-for DATA (a data YAML, JSON or JSONL, e.g. upstream's released files) only the clip lists are
written: %(c)s for DATA's EK100 samples and %(l)s for its other videos
(LLaVA-Video-178K: "video" under its "data_source" folder), to extract with --sampling llava-video.

Samples hold the question, not the prompt (an MC human turn is the Python list of lettered options); the training
pipeline builds the prompt when it loads a sample, with the clip's real frame count. Every sample draws from its
own RNG (seed, narration id, question type, distractor source), so the AVION and TIM copies of a clip are
independent. Prediction files: {"<CSV row index>": {"predictions": ["v:n", ...], "target": "v:n"}}.
""" % {"s": SAMPLES_NAME, "y": YAML_NAME, "c": CLIPS_NAME, "l": LLAVA_VIDEO_CLIPS_NAME}


def clip_of(sample: dict, layout: str) -> dict:
    """The extract-frames clip of an EK100 sample: the uid the pipeline looks up (train_sample.clip_uid), the video
    path in ``layout``, the sample's window."""
    try:
        pid, vid = sample["video"].split("-", 1)
        start, end = float(sample["start_timestamp"]), float(sample["end_timestamp"])
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError(f"{sample.get(SOURCE_KEY, 'sample')}: an EK100 sample needs 'video' (\"P01-P01_01\"), "
                         "'start_timestamp' and 'end_timestamp'") from None
    video = f"{pid}/{vid}.MP4" if layout == "chunked" else f"{pid}/videos/{vid}.MP4"
    return {"uid": clip_uid(sample), "video": video, "start": start, "end": end}


def llava_video_clip(sample: dict) -> dict:
    """The clip of another video sample: LLaVA-Video-178K's ``video`` is relative to its ``data_source`` folder
    (upstream reads ``video_folder/LLaVA-Video-178K/data_source/video``)."""
    source = sample.get("data_source")
    clip = {"uid": clip_uid(sample), "video": f"{source}/{sample['video']}" if source else sample["video"]}
    if sample.get("start") is not None and sample.get("end") is not None:
        clip.update(start=float(sample["start"]), end=float(sample["end"]))
    return clip


def write_clips(samples: list[dict], layout: str, out: pathlib.Path) -> dict[str, int]:
    """``clips.jsonl`` (EK100 samples) and, when there are any, ``clips_llava_video.jsonl`` (other video samples),
    each clip once; returns the number of clips per file written."""
    ek100_clips, other_clips = {}, {}
    for sample in samples:
        if is_ek100(sample):
            clip = clip_of(sample, layout)
            ek100_clips.setdefault(clip["uid"], clip)
        elif clip_uid(sample) is not None:
            clip = llava_video_clip(sample)
            other_clips.setdefault(clip["uid"], clip)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, clips in ((CLIPS_NAME, ek100_clips), (LLAVA_VIDEO_CLIPS_NAME, other_clips)):
        if clips or name == CLIPS_NAME:
            with open(out / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(clip) + "\n" for clip in clips.values())
            counts[name] = len(clips)
    return counts


def planned_files(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """(relative path, task, MC source) of every file to write, in YAML order."""
    k, rep = args.n_options, args.representation
    files = []
    if "mc" in args.tasks:
        for source, predictions in (("avion", args.avion), ("tim", args.tim)):
            if predictions:
                files.append((f"{source}_mc_top{k}_{rep}/{SAMPLES_NAME}", "mc", source))
        if args.random_mc or not (args.avion or args.tim):
            files.append((f"random_mc_top{k}_{rep}/{SAMPLES_NAME}", "mc", "random"))
    if "direct_narration" in args.tasks:
        files.append((f"direct_narration_{rep}/{SAMPLES_NAME}", "direct_narration", None))
    if "temporal_detection" in args.tasks:
        files.append(("temporal_detection.jsonl", "temporal_detection", None))
    return files


def build(args: argparse.Namespace, log=print) -> dict:
    """Write everything; returns {relative path: number of samples}."""
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} is not empty; choose another --out or pass --overwrite")
    train_csvs = args.train_csv or labels.default_train_csvs(args.annotations, args.label_space)
    maps = labels.load_label_maps(args.annotations, train_csvs=train_csvs, label_space=args.label_space)
    segments = [s for path in train_csvs for s in labels.read_annotation_csv(path)]
    if len(train_csvs) > 1 and (args.avion or args.tim):
        raise ValueError("prediction files are keyed by the row index of one CSV; pass a single --train-csv")
    settings = train_files.TrainSampleSettings(args.n_options, args.representation, seed=args.seed)
    log(f"build-train: {len(segments)} segments from {', '.join(map(str, train_csvs))}, {len(maps.vn2act)} actions")
    counts, written = {}, []
    for relative, task, source in planned_files(args):
        started = time.perf_counter()
        path = {"avion": args.avion, "tim": args.tim}.get(source)
        predictions = labels.load_predictions(path) if path else None
        samples = train_files.training_samples(task, segments, maps, settings, predictions, str(path or ""), source)
        train_files.write_samples_jsonl(samples, out / relative)
        written += samples
        counts[relative] = len(samples)
        log(f"  {relative}: {len(samples)} samples ({time.perf_counter() - started:.1f} s)")
    yaml_lines = ["datasets:"] + [f"  - json_path: {(out / r).absolute()}\n    sampling_strategy: all" for r in counts]
    (out / YAML_NAME).write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    n_clips = write_clips(written, args.layout, out)[CLIPS_NAME]
    log(f"  {YAML_NAME}: {len(counts)} files; {CLIPS_NAME}: {n_clips} clips")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--annotations", help="epic-kitchens-100-annotations folder (label maps); required unless "
                        "--clips-for")
    parser.add_argument("--clips-for", metavar="DATA", help="only write the clip lists of DATA's samples (a data "
                        f"YAML or a JSON / JSONL sample file): {CLIPS_NAME} and {LLAVA_VIDEO_CLIPS_NAME}")
    parser.add_argument("--train-csv", nargs="+", help="CSV(s) to build samples from (default: EPIC_100_train.csv, "
                        "or the UDA train files with --label-space uda)")
    parser.add_argument("--label-space", choices=labels.LABEL_SPACES, default="ek100",
                        help="ek100: action ids of EPIC_100_train.csv (the released 3806-way head; refused when "
                             "missing); uda: the UDA train files instead (other ids) (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--tasks", nargs="+", choices=train_files.TASKS, default=list(train_files.TASKS),
                        help="what to build (default: all)")
    parser.add_argument("--avion", metavar="JSON",
                        help="AVION predictions on the train CSV (avion_pred_ids_train.json)")
    parser.add_argument("--tim", metavar="JSON",
                        help="TIM predictions on the train CSV (tim_pred_ids_train_cross.json)")
    parser.add_argument("--random-mc", action="store_true",
                        help="also build MC with random distractors (the default when no prediction file is given)")
    parser.add_argument("--n-options", type=int, default=5, help="options per MC question (default: %(default)s)")
    parser.add_argument("--representation", choices=("GT_random_narration", "official_key"),
                        default="GT_random_narration", help="option texts (default: %(default)s, the final run's)")
    parser.add_argument("--layout", choices=("whole", "chunked"), default="chunked",
                        help=f"video layout the paths in {CLIPS_NAME} follow: chunked {{pid}}/{{vid}}.MP4/ (AVION's "
                             "15 s chunks, as upstream trains) or whole {pid}/videos/{vid}.MP4 (default: %(default)s)")
    cli_flags.add_num_frames(parser, "for the extract-frames command printed at the end; the prompts state the "
                                     "frame count of the extracted clips (default: %(default)s, the final run's)",
                             default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of every per-sample RNG (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    try:
        if args.clips_for:
            existing = [str(out / n) for n in (CLIPS_NAME, LLAVA_VIDEO_CLIPS_NAME) if (out / n).exists()]
            if existing and not args.overwrite:
                raise ValueError(f"{' and '.join(existing)} already exist; choose another --out or pass --overwrite")
            counts = write_clips(load_mixture(args.clips_for), args.layout, out)
            print(f"build-train: clips of {args.clips_for}: "
                  + ", ".join(f"{out / name}: {n}" for name, n in counts.items()))
        elif not args.annotations:
            raise ValueError("pass --annotations (or --clips-for)")
        else:
            build(args)
    except (ValueError, OSError) as error:  # AnnotationError and MixtureError are ValueErrors
        print(f"build-train: error: {error}", file=sys.stderr)
        return 2
    print("next:\n"
          f"  python -m llavaction_jax extract-frames --jsonl {out / CLIPS_NAME} --sampling ek100 --layout "
          f"{args.layout} --num-frames {args.num_frames} --video-root EK100_VIDEOS --out SHARDS\n"
          + (f"  python -m llavaction_jax extract-frames --jsonl {out / LLAVA_VIDEO_CLIPS_NAME} --sampling "
             "llava-video --frames-upbound 64 --video-root LLaVA-Video-178K --out SHARDS_178K\n"
             if (out / LLAVA_VIDEO_CLIPS_NAME).exists() else "")
          + 
          f"  python -m llavaction_jax train --config configs/train.py --config.data.samples="
          f"{args.clips_for or out / YAML_NAME} "
          "--config.data.shards=SHARDS ...")
    return 0
