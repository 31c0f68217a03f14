"""The evaluation run: fixed-shape batches of this process's questions through the jitted answer step (one prefill for
every answer mode), then the records of all processes gathered on process 0, checked, scored and written (see
eval/mqa_eval.py for the command).

Prediction record (one line of predictions.jsonl, :func:`prediction_record`): index (0-based line in the question
file), uid, clip_uid, options, gt_letter, gt_text, groups, the question file's extra keys (EK100: gt_vn,
option_vns, top1_text, source, narration), num_frames (the frames of the clip the model saw), prompt_tokens, and
per mode
  generate: raw (decoded, special tokens skipped), parsed (upstream's parse), letter, correct_text (upstream's
            metric), correct_letter, num_tokens (including the EOS);
  score:    letter (highest logprob_sum), correct_letter, correct_text, letter_normalized (highest logprob_mean),
            correct_letter_normalized, logprob_sum / logprob_mean / num_tokens per option.

Resuming: each process appends its records to ``OUT/predictions.partial.p<i>.jsonl`` as soon as a step is answered
(after a header line fingerprinting, by content, the question file, the model, the shards and every setting that
changes an answer: eval/resume_key.py). A rerun with the same fingerprint answers only the questions no process
has recorded; one with another fingerprint moves the file aside (``.stale``). A row's answer does not depend on
the other rows of its batch, so a resumed run writes the same predictions.jsonl and results.json (up to the
``run`` timings) as an uninterrupted one.

Unreadable clips (missing from the shards, or not decoding) make failed records, counted wrong and listed in
results.json's ``failed`` (eval/clip_failures.py), unless ``strict``; a rerun retries them (their partial file is
kept, without them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from llavaction_jax import vision_towers
from llavaction_jax.api import answer_step, generation_config
from llavaction_jax.config import ExecutionConfig
from llavaction_jax.data.frames import FrameShards
from llavaction_jax.ek100.mqa import slice_bounds
from llavaction_jax.eval import batching, clip_failures, lmms_layout, metrics, questions as qs, report, resume_key
from llavaction_jax.eval.benchmarks import score as benchmark_score
from llavaction_jax.eval.parsing import score_answer
from llavaction_jax.model import llava
from llavaction_jax.pause_points import pause_point
from llavaction_jax.progress import eta
from llavaction_jax.sharding import local_rows, resolve_execution, shard_batch, use_mesh

RESULTS_SCHEMA = "llavaction_jax.eval_results/1"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8  # questions per process per step
    modes: tuple[str, ...] = ("generate",)
    max_new_tokens: int = 4096  # upstream's budget
    num_frames: int | None = None  # most frames per clip (default: the shards' most); shorter clips keep their own
    prompt_len: int | None = None  # default: the longest prompt rounded up to 32
    limit: int | None = None  # evaluate the first N questions only
    fmt: str = "auto"
    label_space: str = "ek100"  # "uda": accept EK100 questions whose action ids index the UDA stand-ins
    time_instruction: bool = True  # videoqa: LLaVA-Video's time instruction
    instruction: str = ""  # videoqa: the line after the options (default: questions.DEFAULT_VIDEOQA_INSTRUCTION)
    threads: int = 4  # frame-decoding threads
    options_per_pass: int | None = None  # scoring: options per pass over the broadcast prompt cache (None: all)
    progress_every_s: float = 10.0
    strict: bool = False  # an unreadable clip stops the run (default: recorded as failed, counted wrong)


def check_tokenizer_fits(cfg, tokenizer) -> None:
    if cfg.text.vocab_size < len(tokenizer):
        raise ValueError(
            f"the model's vocabulary has {cfg.text.vocab_size} rows but the tokenizer has {len(tokenizer)} tokens, so "
            f"prompt ids up to {len(tokenizer) - 1} cannot be embedded. Use the checkpoint's own tokenizer "
            "(--tokenizer DIR), or, for a random preset, a vocabulary that covers the tokenizer "
            "(--config.model.text.vocab_size=151680).")


def run_frame_count(shards: FrameShards, requested: int | None) -> int:
    """Frames per clip of the run's batches: ``requested`` (a clip with more is subsampled to it), else the most a
    clip of the shards has (their fixed count, or the 1-fps cap they were extracted with). Clips with fewer frames
    keep their own and are padded to it."""
    if requested is not None and requested < 1:
        raise ValueError(f"--num-frames must be at least 1, got {requested}")
    if requested and shards.frames_per_clip and requested > shards.frames_per_clip:
        raise ValueError(f"--num-frames {requested}: every clip in {shards.directory} has {shards.frames_per_clip} "
                         "frames; extract more frames per clip to feed more")
    num_frames = requested or shards.max_frames_per_clip
    if num_frames is None:
        raise ValueError(f"{shards.directory}: clips have varying frame counts without a cap in manifest.json "
                         "(extracted with --frames-upbound 0); pass --num-frames")
    return num_frames


def make_step(params, cfg, mesh, layout, gen, modes, execution: ExecutionConfig | None = None):
    """The step answering a batch in every mode of `modes` (api.answer_step: one prefill, generation and option
    scoring from its cache): this process's host batch in global form -> {mode: global outputs} (batch split like
    the inputs). `execution` is resolved for the mesh here, once; JAX's jit cache reuses the executable across runs
    with the same (config, shapes)."""
    n_vis = cfg.tokens_per_video(layout.num_frames)
    out_len = llava.default_out_len(cfg, layout.prompt_len, n_vis)
    if out_len < layout.prompt_len - 1 + n_vis:
        raise ValueError(f"prompts of {layout.prompt_len} tokens + {n_vis} visual tokens exceed "
                         f"tokenizer_model_max_length={cfg.tokenizer_model_max_length}")
    resolved = resolve_execution(execution or ExecutionConfig(), mesh)
    step = functools.partial(answer_step, cfg=cfg, execution=resolved, gen=gen if "generate" in modes else None,
                             out_len=out_len, vocab_limit=gen.vocab_limit, options_per_pass=layout.options_per_pass)
    # Option arrays only where options are scored, so one compiled generation step serves question files with
    # other option layouts.
    keys = ("input_ids", "pixel_values", "attention_mask", "num_frames")
    keys += ("option_ids", "option_mask") if "score" in modes else ()

    def run(batch):
        with use_mesh(mesh):
            return step(params, {k: batch[k] for k in keys})

    return run


def prediction_record(question, info: dict, outputs: dict, row: int, tokenizer, modes) -> dict:
    """One line of predictions.jsonl: the question's identity and GT, then per mode what the model answered."""
    record = {"index": info["index"], "uid": question.uid, "clip_uid": info["clip_uid"],
              "options": list(question.options), "gt_letter": question.gt_letter, "gt_text": question.gt_text,
              "groups": question.groups, **question.extra, "num_frames": info["num_frames"],
              "prompt_tokens": info["prompt_tokens"]}
    if "generate" in modes:
        n = int(outputs["generate"]["num_tokens"][row])
        raw = tokenizer.decode(outputs["generate"]["tokens"][row, :n].tolist(), skip_special_tokens=True)
        record["generate"] = {"raw": raw, **score_answer(raw, list(question.options), question.gt_letter,
                                                         question.gt_text), "num_tokens": n}
    if "score" in modes:
        k = len(question.options)
        sums = outputs["score"]["logprob_sum"][row, :k]
        means = outputs["score"]["logprob_mean"][row, :k]
        letter, letter_norm = (question.options[int(np.argmax(x))].split(". ", 1)[0] for x in (sums, means))
        texts = question.option_texts()
        record["score"] = {
            "letter": letter, "correct_letter": letter == question.gt_letter,
            "correct_text": texts[int(np.argmax(sums))] == question.gt_text,
            "letter_normalized": letter_norm, "correct_letter_normalized": letter_norm == question.gt_letter,
            "logprob_sum": [float(x) for x in sums], "logprob_mean": [float(x) for x in means],
            "num_tokens": [int(x) for x in outputs["score"]["num_tokens"][row, :k]]}
    return record


def gather_records(records: list[dict]) -> list[dict] | None:
    """All processes' records on process 0 (in process order), None elsewhere: a byte all-gather, so no shared
    filesystem is needed between hosts."""

    payload = np.frombuffer(json.dumps(records).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    if jax.process_index() != 0:
        return None
    return [r for p, n in enumerate(sizes) for r in json.loads(gathered[p, :n].tobytes())]


def check_coverage(records: list[dict], questions) -> list[dict]:
    """Records sorted into file order; raises unless every question is answered exactly once."""
    by_index: dict[int, dict] = {}
    for r in records:
        if r["index"] in by_index:
            raise RuntimeError(f"question {r['uid']!r} (line {r['index'] + 1}) was answered twice")
        by_index[r["index"]] = r
    missing = [q.uid for i, q in enumerate(questions) if i not in by_index]
    if missing or len(by_index) != len(questions):
        raise RuntimeError(f"{len(missing)} questions were not answered (first: {missing[:5]})")
    ordered = [by_index[i] for i in range(len(questions))]
    if [r["uid"] for r in ordered] != [q.uid for q in questions]:
        raise RuntimeError("answered uids do not match the question file")
    return ordered


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


PARTIAL_NAME = "predictions.partial.p{}.jsonl"


def load_partial(path: pathlib.Path, fingerprint: str, num_questions: int, log) -> list[dict]:
    """Records of an interrupted run with the same fingerprint; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        os.replace(path, path.with_name(path.name + ".stale"))
        log(f"[eval] {path} is from a run with other settings: moved to {path.name}.stale, starting over")
        return []
    records, good_bytes = [], len(lines[0]) + 1
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or not 0 <= record.get("index", -1) < num_questions:
            break
        if not record.get("failed"):  # a question whose clip could not be read is answered again
            records.append(record)
        good_bytes += len(line) + 1
    with open(path, "r+b") as f:  # drop a torn tail so appends start on a line boundary
        f.truncate(min(good_bytes, path.stat().st_size))
    return records


def _answered_anywhere(records: list[dict], num_questions: int) -> np.ndarray:
    """Indices answered by any process's partial file (the same on every process)."""
    mask = np.zeros(num_questions, np.int32)
    mask[[r["index"] for r in records]] = 1
    if jax.process_count() > 1:
        mask = np.asarray(multihost_utils.process_allgather(mask)).reshape(-1, num_questions).max(0)
    return mask.astype(bool)


def evaluate(params, cfg, tokenizer, questions_path, shards_dir, out_dir, settings: EvalSettings, mesh, *,
             model_name: str = "model", model_dir: str | None = None, tokenizer_name: str = "",
             annotations: str | None = None, execution: ExecutionConfig | None = None, log=print) -> dict | None:
    """Answer every question of the file on ``mesh`` (with the model's `execution` choices) and write the outputs;
    returns the results on process 0, None on the others. Everything before the first collective is checked identically by every process, so bad
    inputs fail everywhere at once instead of leaving peers waiting."""

    t_start = time.perf_counter()
    fmt, meta, questions = qs.load_questions(questions_path, settings.fmt, settings.label_space)
    questions = questions[: settings.limit] if settings.limit else questions
    check_tokenizer_fits(cfg, tokenizer)
    shards = FrameShards(shards_dir)
    missing = [q.uid for q in questions if not any(uid in shards for uid in q.clip_uids)]
    if missing and settings.strict:
        raise KeyError(f"{len(missing)} questions have no clip in {shards_dir} (first: {missing[:5]})")
    if missing and jax.process_index() == 0:
        log(f"[eval] warning: {len(missing)} questions have no clip in {shards_dir} (first: {missing[:5]}): recorded "
            "as failed and counted wrong (--strict stops instead)")
    num_frames = run_frame_count(shards, settings.num_frames)
    stated = (meta or {}).get("settings", {})
    if stated.get("include_time_instruction") and stated.get("n_frames") != num_frames and jax.process_index() == 0:
        log(f"[eval] warning: the prompts state {stated.get('n_frames')} frames, the model sees {num_frames}")
    batching.check_batch_layout(mesh, settings.batch_size, jax.process_count())
    builder = batching.PromptBuilder(tokenizer, settings.time_instruction,
                                     settings.instruction or qs.DEFAULT_VIDEOQA_INSTRUCTION)
    layout = builder.layout(questions, settings.batch_size, num_frames, cfg.vision.image_size, settings.prompt_len,
                            settings.options_per_pass)
    gen = generation_config(tokenizer, settings.max_new_tokens, cfg.text.vocab_size, model_dir)
    execution = execution or ExecutionConfig()
    answer = make_step(params, cfg, mesh, layout, gen, settings.modes, execution)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = resume_key.fingerprint(questions_path, meta, shards_dir, model_dir, model_name, cfg,
                                         resolve_execution(execution, mesh), tokenizer, settings, layout, gen)
    partial = out_dir / PARTIAL_NAME.format(jax.process_index())
    kept = {r["index"]: r for r in load_partial(partial, fingerprint, len(questions), log)}
    done = _answered_anywhere(list(kept.values()), len(questions))
    todo = [i for i in range(len(questions)) if not done[i]]
    loader = batching.ClipLoader(shards, num_frames, cfg.vision.image_size, settings.threads,
                                 vision_towers.lookup(cfg.vision_tower).preprocessing)
    if jax.process_index() == 0:
        log(f"[eval] {len(questions)} {fmt} questions, {jax.process_count()} process(es), steps of "
            f"{settings.batch_size} per process; modes {'+'.join(settings.modes)}; up to {num_frames} frames per "
            f"clip; prompts padded to {layout.prompt_len} tokens, {layout.num_options} options x {layout.option_len} tokens"
            + (f"; resuming: {len(questions) - len(todo)} already answered" if len(todo) < len(questions) else ""))
    if not partial.is_file():
        partial.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    try:
        with open(partial, "a", encoding="utf-8") as sink:
            records, timing = answer_slice(questions, todo, layout, builder, loader, answer, mesh, tokenizer, settings,
                                           log, sink)
    finally:
        loader.pool.shutdown()

    retry = any(r.get("failed") for r in records)  # this process's partial file stays for a rerun to retry them
    gathered = gather_records(list(kept.values()) + records)
    if gathered is None:
        _remove_partial_after_all(partial, retry)
        return None
    ordered = check_coverage(gathered, questions)
    results = {
        "schema": RESULTS_SCHEMA, "questions": str(questions_path), "format": fmt,
        "question_settings": (meta or {}).get("settings"),
        "model": {"name": model_name, "vocab_size": cfg.text.vocab_size, "param_dtype": cfg.param_dtype,
                  "compute_dtype": execution.compute_dtype, "tokenizer": tokenizer_name, "tokenizer_len": len(tokenizer),
                  "pool_mode": cfg.pool_mode},
        "settings": {**dataclasses.asdict(settings), "modes": list(settings.modes),
                     "layout": dataclasses.asdict(layout), "generation": dataclasses.asdict(gen)},
        "run": {"process_count": jax.process_count(), "mesh": dict(mesh.shape), "devices": mesh.size,
                **timing, "wall_s": time.perf_counter() - t_start, "resumed_questions": len(questions) - len(todo)},
        **metrics.compute_metrics(ordered, qs.class_names(meta, annotations)),
        "failed": clip_failures.failures_summary(ordered),
    }
    official = benchmark_score.benchmark_results(meta, ordered)  # build-bench files: the benchmark's own scoring
    if official is not None:
        results["benchmark"] = official
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    _write_atomically(out_dir / "predictions.jsonl", lines)
    _write_atomically(out_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    report.write_report(results, out_dir)
    benchmark_score.write_outputs(results, out_dir)
    instruction = settings.instruction or qs.DEFAULT_VIDEOQA_INSTRUCTION
    lmms_content, lmms_samples = lmms_layout.build(
        ordered, [questions[r["index"]].user_message(0.0, num_frames, False, instruction) for r in ordered], fmt=fmt,
        modes=settings.modes, questions_path=str(questions_path), total_questions=len(questions),
        model_name=model_name, batch_size=settings.batch_size, limit=settings.limit,
        gen_kwargs={"max_new_tokens": settings.max_new_tokens, "do_sample": False, "temperature": 0},
        device=mesh.devices.flat[0].platform, wall_s=results["run"]["wall_s"], date=time.time(), meta=meta)
    lmms_layout.write(out_dir, lmms_content, lmms_samples)
    _remove_partial_after_all(partial, retry)
    return results


def _remove_partial_after_all(partial: pathlib.Path, keep: bool = False) -> None:
    """Once process 0 has written the outputs, the partial files are redundant (but those with failed questions,
    which a rerun retries)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("eval outputs written")
    if not keep:
        partial.unlink(missing_ok=True)


def answer_slice(questions, todo, layout, builder, loader, answer, mesh, tokenizer, settings: EvalSettings, log,
                 sink=None):
    """This process's prediction records for its slice of the question indices `todo`, and the run's timing.
    Every process runs the same number of steps (its slice may be one question shorter, or empty); the next
    batch's frames are decoded while the devices work. Each step's records are appended to `sink` at once."""

    bounds = [slice_bounds(len(todo), p, jax.process_count()) for p in range(jax.process_count())]
    start, stop = bounds[jax.process_index()]
    size = settings.batch_size
    num_steps = math.ceil(max(b - a for a, b in bounds) / size)
    chunks = [todo[start:stop][s * size:(s + 1) * size] for s in range(num_steps)]
    fill = todo[start] if stop > start else 0  # the question repeated in rows past the slice's end
    prepare = lambda s: prefetch.submit(batching.build_batch, chunks[s], questions, fill, layout, builder, loader,
                                        settings.strict)

    records, t_loop, t_last_log = [], time.perf_counter(), None
    t_first, rate = t_loop, None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch") as prefetch:
        future = prepare(0) if num_steps else None
        for step in range(num_steps):
            arrays, info = future.result()
            if step + 1 < num_steps:
                future = prepare(step + 1)
            batch = shard_batch(arrays, mesh)
            outputs = local_rows(answer(batch), mesh)
            new = [clip_failures.failed_record(questions[r["index"]], r, settings.modes) if "error" in r else
                   prediction_record(questions[r["index"]], r, outputs, row, tokenizer, settings.modes)
                   for row, r in enumerate(info)]
            records += new
            if sink is not None and new:
                sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                sink.flush()
                os.fsync(sink.fileno())
                pause_point("eval-step-written", step)  # a step's answers are on disk (tests stop here)
            now, done = time.perf_counter(), sum(min(b - a, (step + 1) * size) for a, b in bounds)
            if step == 0:
                t_first, done_first = now, done
            rate = (done - done_first) / (now - t_first) if step else done / (now - t_loop)
            if jax.process_index() == 0 and (t_last_log is None or now - t_last_log >= settings.progress_every_s
                                             or step + 1 == num_steps):
                log(f"[eval] step {step + 1}/{num_steps}: {done}/{len(todo)} questions, {rate:.2f} questions/s, "
                    f"{eta(done, len(todo), rate)}" + (" (first step, incl. compilation)" if step == 0 else ""),
                    flush=True)
                t_last_log = now
    # questions/s after the first step, which includes compilation (all of it when there is only one step)
    return records, {"steps": num_steps, "first_step_s": t_first - t_loop, "questions_per_second": rate}
