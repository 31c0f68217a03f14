"""``python -m llavaction_jax build-bench BENCHMARK``: a benchmark's official annotation files -> question files
for ``eval`` and clip lists for ``extract-frames`` (one folder per lmms-eval task variant; see common.py)."""

from __future__ import annotations

import argparse
import pathlib
import sys

from llavaction_jax.config import POOL_MODES
from llavaction_jax.eval.benchmarks import BENCHMARKS, common

DESCRIPTION = """\
Build question files from a benchmark's official annotation files. Writes, per lmms-eval task variant,
OUT/<variant>/questions.jsonl (+ .meta.json) and OUT/<variant>/clips.jsonl. Then decode the frames once:

  python -m llavaction_jax extract-frames --jsonl OUT/<variant>/clips.jsonl --video-root VIDEOS \\
      --out OUT/<variant>/shards --sampling llava-video --frames-upbound 64

(lmms-eval's llava_vid sampling: 1 frame per second, 64 spread over a longer video; add --force-sample for 64
frames from every video) and evaluate (or run several with eval-suite; a clip keeps its own frame count):

  python -m llavaction_jax eval --model MODEL --questions OUT/<variant>/questions.jsonl \\
      --shards OUT/<variant>/shards --out RESULTS

The question file's meta records the model settings the authors ran lmms-eval's llava_vid with
(max_frames_num=64, mm_spatial_pool_mode=average: 2x2 average pooling, 169 tokens a frame) and the task's
generation budget; eval and eval-suite use them unless told otherwise (--config.model.pool_mode, --pool-mode,
--max-new-tokens). Prompts, answer parsing and metrics follow lmms-eval's task definitions (docs/benchmarks.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=" ".join(module.__doc__.split(":", 1)[0].split()), description=module.__doc__)
        module.add_arguments(p)
        p.add_argument("--out", required=True, help="output folder (one sub-folder per task variant)")
        p.add_argument("--time-instruction", choices=common.TIME_STYLES, default="none",
                       help="instruction eval prepends: none (lmms-eval's llava_vid default, and the authors' "
                            "runs), lmms-eval (llava_vid add_time_instruction=True: duration, frame count and "
                            "frame times), llava-video (LLaVA-Video / LLaVAction training's) (default: none)")
        p.add_argument("--pool-mode", choices=POOL_MODES, default="average",
                       help="pooling eval applies, recorded in the meta: average = lmms-eval llava_vid's "
                            "mm_spatial_pool_mode as the authors ran it (169 tokens a frame); bilinear = the "
                            "checkpoint's own (196) (default: average)")
        p.add_argument("--max-frames-num", type=int, default=64,
                       help="frames cap to extract with (--frames-upbound), recorded in the meta: the authors' "
                            "max_frames_num (default: 64)")
        p.add_argument("--overwrite", action="store_true", help="replace question files already in --out")


def run(args: argparse.Namespace) -> int:
    try:
        built = BENCHMARKS[args.benchmark].build(args)
        settings = {"time_instruction": args.time_instruction, "pool_mode": args.pool_mode,
                    "max_frames_num": args.max_frames_num}
        for item in built:
            folder = common.write_variant(pathlib.Path(args.out), item, settings, args.overwrite)
            print(f"[build-bench] {item.variant.name}: {len(item.questions)} questions over {len(item.clips)} "
                  f"clips -> {folder}", file=sys.stderr)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # bad inputs, unreadable videos: one line
        print(f"build-bench: error: {e}", file=sys.stderr)
        return 2
    return 0
