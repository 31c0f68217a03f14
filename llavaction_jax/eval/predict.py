"""``python -m llavaction_jax predict``: ask a model about a video file, no frame shards or question file needed.

What upstream's inference does for one clip (llavaction/action/llava_inference.py: llava_inference), batched:

1. decode ``--num-frames`` frames of ``--start``..``--end`` (data/clip.py: upstream's segment-midpoint sampling,
   PIL bicubic resize, [-1, 1] normalisation; decord, PyAV as the fallback);
2. build upstream's prompt: with ``--options`` the EK100 multiple-choice prompt (ek100/prompts.mc_prompt) behind the
   time instruction, byte for byte what `build-mqa --time-instruction` stores; with ``--question`` that question;
   with neither, upstream's direct-narration prompt ("What action are you performing? ...");
3. greedy decoding (`LlavaModel.generate`, the jitted step of `eval`), and with options the log-likelihood of each
   option (`LlavaModel.score_options`, model/decode.py).

``--batch FILE.jsonl`` answers one clip per line (``{"video", "start"?, "end"?, "question"? | "options"?}``, paths
relative to the file) in steps of ``--batch-size`` clips, and writes one JSON record per line to ``--out`` (or
stdout), with the line number as ``line``. A clip that cannot be read gets a record with ``error`` and the run
goes on (exit status 3 at the end); with ``--out``, a rerun of the same command keeps the answers, retries the
failed lines and finishes an interrupted run (eval/predict_resume.py), and the run holds the lock of OUT
(locks.py). An ``end`` past the video's end is sampled up to its last frame and said so (``note``). Information
and progress go to stderr; answers to stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time

import jax

from llavaction_jax import cli_flags, locks, vision_towers
from llavaction_jax.api import LlavaModel, load_pretrained
from llavaction_jax.checkpoint_io import is_model_dir, load_config, load_execution
from llavaction_jax.data.clip import read_clip
from llavaction_jax.data.tokenizer import load_qwen_tokenizer
from llavaction_jax.data.video import VideoCache
from llavaction_jax.ek100 import prompts
from llavaction_jax.eval import predict_resume
from llavaction_jax.eval.parsing import answer_letter, parse_answer
from llavaction_jax.eval.questions import option_texts
from llavaction_jax.model_files import trained_num_frames
from llavaction_jax.recipes import configs_with_overrides, model_overrides

DEFAULT_NUM_FRAMES = 16  # upstream's evaluation clip_length, for a model that does not say what it was trained on
PROMPT_ROUNDING = 32
ACCEPTS_CONFIG_OVERRIDES = True  # --config.model.<field>=value, as in `eval`
COMPUTE_FIELD = "compute_dtype"  # --compute-dtype is an alias of --config.model.compute_dtype
EXIT_SOME_FAILED = 3  # as extract-frames: the run finished, some clips could not be read


@dataclasses.dataclass(frozen=True)
class Item:
    """One clip to answer about, and where it came from (for error messages)."""

    video: str
    start: float | None = None
    end: float | None = None
    question: str | None = None
    options: tuple[str, ...] = ()  # lettered "A. open door"
    where: str = "command line"
    line: int | None = None  # of the --batch file


def make_item(video: str, start=None, end=None, question=None, options=None, where: str = "command line",
              line: int | None = None) -> Item:
    if question is not None and options:
        raise ValueError(f"{where}: give a question or options, not both")
    lettered = tuple(prompts.letter_options(option_texts(list(options)))) if options else ()
    return Item(video, None if start is None else float(start), None if end is None else float(end), question,
                lettered, where, line)


def read_batch_file(path: str) -> list[Item]:
    """Items of a JSONL file; video paths are relative to the file's folder. Errors name the file and line."""
    folder, items = pathlib.Path(path).parent, []
    for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            unknown = set(record) - {"video", "start", "end", "question", "options"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            cli_flags.refuse_urls([("video", record["video"])])  # before it is joined to the file's folder
            items.append(make_item(str(folder / record["video"]), record.get("start"), record.get("end"),
                                   record.get("question"), record.get("options"), where, number))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: not a predict item ({type(error).__name__}: {error}); expected "
                             '{"video": PATH, "start"?: s, "end"?: s, "question"?: TEXT | "options"?: [TEXT, ...]}'
                             ) from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def user_message(item: Item, duration: float, num_frames: int, time_instruction: bool) -> str:
    """Upstream's user turn for the item: MC prompt, the question, or the direct-narration prompt."""
    if item.options:
        task = prompts.mc_prompt(list(item.options))
    elif item.question is not None:
        task = item.question
    else:
        task = prompts.direct_narration_prompt()
    return prompts.user_message(task, duration, num_frames, time_instruction)


def chosen_option(raw: str, options: tuple[str, ...]) -> str | None:
    """The option a generated answer names: the option whose text equals upstream's parse of it (upstream's
    metric compares texts), else the option of the letter it gives; None when it names none."""
    text = parse_answer(raw)
    for option in options:
        if option.split(". ", 1)[-1] == text:
            return option
    letter = answer_letter(raw, list(options))
    return next((o for o in options if o.split(". ", 1)[0] == letter), None)


def answer_items(model: LlavaModel, items: list[Item], num_frames: int, time_instruction, batch_size: int,
                 max_new_tokens: int, decoder: str, log, on_record) -> None:
    """Answer `items` in steps of `batch_size` (a short last step repeats its first clip, so every step has one
    shape); each record goes to `on_record` as soon as its step is answered. The next step's clips are decoded
    while the model works."""
    videos = VideoCache(decoder)
    image_size = model.cfg.vision.image_size
    preprocessing = vision_towers.lookup(model.cfg.vision_tower).preprocessing
    steps = math.ceil(len(items) / batch_size)

    def read(item: Item):
        try:
            return read_clip(item.video, item.start, item.end, num_frames, image_size, videos, preprocessing)
        except (ValueError, OSError, RuntimeError) as error:  # read_clip's errors name the file
            return error

    load = lambda s: [read(i) for i in items[s * batch_size:(s + 1) * batch_size]]
    started, prompt_len = time.perf_counter(), None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clips") as pool:
        future = pool.submit(load, 0) if steps else None
        for step in range(steps):
            chunk, clips = items[step * batch_size:(step + 1) * batch_size], future.result()
            if step + 1 < steps:
                future = pool.submit(load, step + 1)
            good = [r for r, clip in enumerate(clips) if not isinstance(clip, Exception)]
            for r in sorted(set(range(len(chunk))) - set(good)):  # recorded as failed; the others are answered
                on_record(failed_record(chunk[r], clips[r]))
            if not good:
                continue
            rows = good + [good[0]] * (batch_size - len(good) if steps > 1 else 0)
            timed = [time_instruction if time_instruction is not None else bool(chunk[r].options) for r in rows]
            messages = [user_message(chunk[r], clips[r].duration, num_frames, t) for r, t in zip(rows, timed)]
            pixels = [clips[r].pixels for r in rows]
            prompt_len = max(prompt_len or 0, _padded_prompt_len(model, messages))  # grows only: few compiles
            answers = model.generate(pixels, messages, max_new_tokens=max_new_tokens, prompt_len=prompt_len)
            scores = None
            if any(chunk[r].options for r in rows):
                scores = model.score_options(pixels, messages, [list(chunk[r].options) for r in rows],
                                             prompt_len=prompt_len)
            for k, r in enumerate(good):
                on_record(record(chunk[r], clips[r], messages[k], answers[k], scores[k] if scores else None))
            done = min(len(items), (step + 1) * batch_size)
            rate = done / (time.perf_counter() - started)
            log(f"[predict] step {step + 1}/{steps}: {done}/{len(items)} clips, {rate:.2f} clips/s"
                + (" (first step, incl. compilation)" if step == 0 else ""))


def _padded_prompt_len(model: LlavaModel, messages: list[str]) -> int:
    longest = max(len(ids) for ids in model.prompt_ids(messages))
    return max(PROMPT_ROUNDING, math.ceil(longest / PROMPT_ROUNDING) * PROMPT_ROUNDING)


def item_fields(item: Item) -> dict:
    out = {"line": item.line} if item.line is not None else {}
    out.update(video=item.video, start=item.start, end=item.end)
    if item.question is not None:
        out["question"] = item.question
    return out


def failed_record(item: Item, error: Exception) -> dict:
    out = {**item_fields(item), "error": str(error)}
    if item.options:
        out["options"] = list(item.options)
    return out


def record(item: Item, clip, message: str, raw: str, scores: dict | None) -> dict:
    out = {**item_fields(item), "duration": clip.duration, "frame_ids": list(clip.frame_ids), "prompt": message,
           "answer": raw}
    if clip.note:
        out["note"] = clip.note
    if item.options:
        out["options"] = list(item.options)
        out["chosen_option"] = chosen_option(raw, item.options)
    if scores is not None and item.options:
        best = max(range(len(item.options)), key=lambda k: scores["logprob_sum"][k])
        out.update(best_scored_option=item.options[best], logprob_sum=scores["logprob_sum"],
                   logprob_mean=scores["logprob_mean"])
    return out


def print_answer(rec: dict, out=None) -> None:
    """The human-readable answer of one clip (to `out`, default: the current sys.stdout)."""
    out = out or sys.stdout
    print(f"answer: {rec['answer']}", file=out)
    if "options" not in rec:
        return
    print(f"chosen option: {rec['chosen_option'] or '(the answer names none of the options)'}", file=out)
    print("option scores (log-likelihood of answering with the option; higher is likelier):", file=out)
    width = max(map(len, rec["options"]))
    for option, total, mean in zip(rec["options"], rec["logprob_sum"], rec["logprob_mean"]):
        mark = "  <- best" if option == rec["best_scored_option"] else ""
        print(f"  {option:<{width}}  sum {total:9.3f}  per token {mean:8.3f}{mark}", file=out)


DESCRIPTION = """Ask a model about a video file (no frame shards or question file needed): it prints the answer and, with
--options, the option it names and the log-likelihood of every option (upstream's MC prompt, time instruction,
frame sampling and preprocessing; greedy decoding).

Examples:
  python -m llavaction_jax predict --model ckpt/llavaction-7b --video P01_01.MP4 --start 12.5 --end 14.2 \\
      --options "open door" "close door" "take cup" "put cup" "wash hand"
  python -m llavaction_jax predict --model ckpt/llavaction-7b --video clip.mp4 --question "What is in my hand?"
  python -m llavaction_jax predict --model ckpt/llavaction-7b --batch clips.jsonl --out answers.jsonl

The model directory is ours (convert / train output) or a PyTorch checkpoint (converted in memory); its own
tokenizer is used (else Qwen2's). --num-frames defaults to the frames the model was trained on (its config.json's
frames_upbound), else 16. Any model config field can be set as in `eval`: --config.model.<field>=VALUE."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    a = parser.add_argument
    a("--model", required=True, help="model directory (ours, or a PyTorch checkpoint directory)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="video file to ask about")
    source.add_argument("--batch", metavar="FILE.jsonl",
                        help='one clip per line: {"video": PATH (relative to the file), "start"?: s, "end"?: s, '
                             '"question"?: TEXT or "options"?: [TEXT, ...]}')
    a("--start", type=float, default=None, help="--video: clip start in seconds (default: 0)")
    a("--end", type=float, default=None, help="--video: clip end in seconds (default: the end of the video)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--question", help="a free question (default without --options: upstream's direct-narration "
                                         "prompt, 'What action are you performing? ...')")
    what.add_argument("--options", nargs="+", metavar="TEXT",
                      help="answer options, e.g. \"open door\" \"take cup\" (lettered A, B, ... as upstream; "
                           "already lettered ones are kept): the EK100 multiple-choice prompt, and option scores")
    cli_flags.add_num_frames(parser, "sampled from the clip (default: the model's training frames from its "
                                     "config.json, else 16)")
    a("--time-instruction", action=argparse.BooleanOptionalAction, default=None,
      help="state the clip's duration and frame count before the task, as upstream (default: on with options)")
    a("--max-new-tokens", type=int, default=4096, help="generation budget (upstream: 4096; stops at <|im_end|>)")
    a("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
      help=f"an alias of --config.model.{COMPUTE_FIELD}; auto: bfloat16 on GPU / TPU, float32 on CPU (default: auto, "
           "whatever the model's config says)")
    a("--tokenizer", default=None, help="tokenizer directory (default: the model directory's, else Qwen2's)")
    a("--decoder", choices=("auto", "decord", "pyav"), default="auto",
      help="video decoder; auto = decord with PyAV fallback")
    a("--batch-size", type=int, default=8, help="--batch: clips per step")
    a("--out", default=None, help="--batch: write the JSONL records here instead of stdout (a new file; a rerun of "
                                  "an unfinished or partly failed run resumes it, retrying the failed clips)")


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's --config.model overrides, --compute-dtype first as the field it stands for (auto unless
    either sets it)."""
    if any(o.split("=", 1)[0] == f"--config.model.{COMPUTE_FIELD}" for o in args.config_overrides):
        if args.compute_dtype is not None:
            raise ValueError(f"--config.model.{COMPUTE_FIELD} is also set by --compute-dtype; give it once")
        return list(args.config_overrides)
    return [f"--config.model.{COMPUTE_FIELD}={args.compute_dtype or 'auto'}", *args.config_overrides]


def load_model(args) -> LlavaModel:
    model = load_pretrained(args.model)
    cfg, execution = configs_with_overrides(model.cfg, model.execution, overrides_of(args))
    model = LlavaModel(cfg, model.params, model.mesh, model.path, execution)
    if args.tokenizer:
        model.tokenizer = load_qwen_tokenizer(args.tokenizer)
    return model


def check_inputs(args: argparse.Namespace) -> list[Item]:
    """Every argument and input file checked before the model is loaded or anything is written; the items. (A
    --batch line's video that is missing is that clip's failure, recorded in its place, as an unreadable one.)"""
    if args.batch and (args.start is not None or args.end is not None or args.question or args.options):
        raise ValueError("--start, --end, --question and --options apply to --video; give them per line in "
                         "the --batch file")
    cli_flags.require_positive(args, "batch_size", "num_frames", "max_new_tokens")
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise ValueError(f"--end {args.end} must be after --start {args.start}")
    if not (is_model_dir(args.model) or (pathlib.Path(args.model) / "config.json").is_file()):
        raise FileNotFoundError(f"{args.model} is not a model directory (no llavaction_config.json + params/, "
                                "nor a PyTorch config.json)")
    if args.tokenizer:
        cli_flags.require_dir("--tokenizer", args.tokenizer)
    if args.batch:
        cli_flags.require_file("--batch", args.batch)
        items = read_batch_file(args.batch)
    else:
        cli_flags.require_file("--video", args.video)
        items = [make_item(args.video, args.start, args.end, args.question, args.options)]
    model_overrides(overrides_of(args))  # a misspelled or mistyped override fails here, not after loading
    if is_model_dir(args.model):
        configs_with_overrides(load_config(args.model), load_execution(args.model), overrides_of(args))
    return items


def run(args: argparse.Namespace) -> int:
    """Errors (bad inputs, a held lock) are reported by cli.main in one line; 3 when some clips failed."""
    log = lambda text: print(text, file=sys.stderr, flush=True)
    items = check_inputs(args)
    num_frames = args.num_frames or trained_num_frames(args.model) or DEFAULT_NUM_FRAMES
    writes_out = bool(args.out and args.batch)
    with locks.output_lock(args.out, "predict", log) if writes_out else contextlib.nullcontext():
        return _predict(args, items, num_frames, log)


def _predict(args, items: list[Item], num_frames: int, log) -> int:
    output, todo = None, items
    if args.out and args.batch:
        settings = {"num_frames": num_frames, "max_new_tokens": args.max_new_tokens, "decoder": args.decoder,
                    "config": overrides_of(args), "time_instruction": args.time_instruction}
        output = predict_resume.PredictOutput(args.out, predict_resume.fingerprint(args.model, args.tokenizer,
                                                                                   settings))
        done = output.open({i.line: i for i in items}, log)
        todo = [i for i in items if i.line not in done]
    failed = 0

    def on_record(rec: dict) -> None:
        nonlocal failed
        failed += "error" in rec
        if output is not None:
            output.add(rec)
        elif args.batch:
            print(json.dumps(rec, ensure_ascii=False), file=sys.stdout, flush=True)
        elif "error" in rec:
            raise ValueError(rec["error"])  # one clip asked about: its error is the command's
        else:
            log(f"[predict] {rec['video']} {rec['duration']:.3f} s, frames {rec['frame_ids']}")
            if rec.get("note"):
                log(f"[predict] note: {rec['note']}")
            print_answer(rec)

    try:
        if todo:
            devices = jax.devices()
            log(f"[predict] backend {jax.default_backend()} ({len(devices)} x {devices[0].device_kind}); loading "
                f"{args.model}")
            model = load_model(args)
            log(f"[predict] compute {model.resolved.compute_dtype}, params {model.cfg.param_dtype}; "
                f"tokenizer of {len(model.tokenizer)} tokens; {num_frames} frames per clip; {len(todo)} clip(s)")
            answer_items(model, todo, num_frames, args.time_instruction, args.batch_size if args.batch else 1,
                         args.max_new_tokens, args.decoder, log if args.batch else (lambda _: None), on_record)
    finally:
        if output is not None:
            output.close()
    if output is not None:
        failed = output.finish()
    if failed:
        log(f"[predict] {failed} clip(s) FAILED: their records hold the error"
            + (f"; rerun the same command to retry them (the answers in {args.out} are kept)" if output else ""))
        return EXIT_SOME_FAILED
    return 0
