"""``python -m llavaction_jax extract-frames``: decode videos once into ArrayRecord frame shards.

Upstream decodes MP4s inside every training step; we decode each clip's sampled frames once, here, and training /
evaluation read only shards (frames.py). The work list is sorted by video and cut into shards of whole videos, so
each video is opened by one worker; a shard is written under a temporary name and renamed when complete, then a
``<shard>.done.json`` sidecar records its uids and failures. A rerun skips shards whose sidecar lists no
failures, so an interrupted extraction resumes where it stopped, and shards with failed clips are written again
(after the videos are fixed, the rerun fills them in). ``manifest.json`` and ``failures.jsonl`` are written at the
end. The command holds the lock of ``--out`` (locks.py): a second extraction into it is refused.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import multiprocessing
import multiprocessing.pool
import os
import pathlib
import sys
import time

import numpy as np

from llavaction_jax import cli_flags, locks
from llavaction_jax.data import frames as fs
from llavaction_jax.data import sampling
from llavaction_jax.data.image import DEFAULT_FRAME_SIZE, resize_frames
from llavaction_jax.data.video import VideoCache
from llavaction_jax.progress import eta

EXIT_SOME_FAILED = 3
PLAN_NAME = "plan.json"
FAILURES_NAME = "failures.jsonl"
DONE_SUFFIX = ".done.json"
# Settings that do not change the shards' content, so a resumed run may change them.
_RUN_ONLY_SETTINGS = ("workers", "overwrite")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    uid: str
    video_id: str  # "P01-P01_01" for EK100 (upstream's JSON convention), the JSONL "video" value otherwise
    path: str  # the video file, or for the chunked layout the "{vid}.MP4" directory of chunk files
    start_sec: float | None  # None: from the first frame (JSONL without start)
    end_sec: float | None  # None: to the last frame
    extra: dict = dataclasses.field(default_factory=dict)


def _datetime_to_sec(text: str) -> float:
    hours, minutes, seconds = text.split(":")  # upstream datetime2sec: "HH:MM:SS.ss"
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def read_ek100_csv(csv_path: str, video_root: str, layout: str) -> list[ClipSpec]:
    """EK100 annotation rows -> clips; uid = narration_id. Whole layout ``{root}/{pid}/videos/{vid}.MP4``,
    chunked layout ``{root}/{pid}/{vid}.MP4/`` (a directory of ``{chunk_start}.MP4`` files)."""
    clips = []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                pid, vid = row["participant_id"], row["video_id"]
                path = (os.path.join(video_root, pid, "videos", f"{vid}.MP4") if layout == "whole"
                        else os.path.join(video_root, pid, f"{vid}.MP4"))
                extra = {k: row[k] for k in ("narration", "verb", "noun") if k in row}
                extra.update({k: int(row[k]) for k in ("verb_class", "noun_class") if row.get(k)})
                start, end = _datetime_to_sec(row["start_timestamp"]), _datetime_to_sec(row["stop_timestamp"])
                clips.append(ClipSpec(row["narration_id"], f"{pid}-{vid}", path, start, end, extra))
            except (KeyError, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
                raise ValueError(f"{csv_path}:{line}: not an EK100 annotation row ({problem})") from error
    return clips


def read_clip_jsonl(jsonl_path: str, video_root: str) -> list[ClipSpec]:
    """Lines of {"video": path (relative to video_root), "start"?: s, "end"?: s, "uid"?: str}; other keys go to
    ``extra``. Without ``uid`` the clip is named ``{video}`` or ``{video}_{start:.2f}_{end:.2f}``; repeated clips
    (same uid, video and times, e.g. several questions about one video) are extracted once."""
    clips: dict[str, tuple[int, ClipSpec]] = {}
    with open(jsonl_path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                video = item["video"]
                start, end = item.get("start"), item.get("end")
                start, end = (None if start is None else float(start)), (None if end is None else float(end))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{jsonl_path}:{line_no}: expected a JSON object with 'video' ({error})") from error
            whole = start is None and end is None
            uid = str(item.get("uid") or (video if whole else f"{video}_{start or 0:.2f}_{end or 0:.2f}"))
            extra = {k: v for k, v in item.items() if k not in ("video", "start", "end", "uid")}
            clip = ClipSpec(uid, video, os.path.join(video_root, video), start, end, extra)
            if uid in clips and dataclasses.replace(clips[uid][1], extra={}) != dataclasses.replace(clip, extra={}):
                raise ValueError(
                    f"{jsonl_path}:{line_no}: uid {uid!r} already used on line {clips[uid][0]} for another clip")
            clips.setdefault(uid, (line_no, clip))
    return [clip for _, clip in clips.values()]


# ------------------------------------------------------------------------------------------------ one clip
def _ek100_rate(videos: VideoCache, path: str, expected: float | None, settings: dict) -> float:
    """The rate EK100 frame numbers use: the container's, or with ``--assume-fps`` that rate whatever the container
    says (upstream's training loader calls avion_video_loader with its default fps=30); a container that
    disagrees is listed in fps_mismatches either way."""
    assumed = settings.get("assume_fps")
    if assumed is None:
        return videos.frame_rate(path, expected)
    rate = float(videos.open(path).avg_fps)
    if abs(rate - assumed) > 1e-4 * assumed and path not in videos.fps_mismatches:
        videos.fps_mismatches[path] = rate
        print(f"[extract-frames] {path} runs at {rate:g} fps; its frame numbers assume {assumed:g} (--assume-fps, "
              "as upstream's training loader)", file=sys.stderr, flush=True)
    return assumed


def extract_clip(clip: ClipSpec, settings: dict, videos: VideoCache) -> fs.ClipRecord:
    """Sample, decode, resize and encode one clip according to ``settings`` (see ``settings_from_args``)."""
    fps = settings["fps"]
    if settings["layout"] == "chunked":
        def chunk_path(chunk_start: int) -> str:
            return os.path.join(clip.path, f"{chunk_start}.MP4")

        def chunk_frame_count(chunk_start: int) -> int | None:
            path = chunk_path(chunk_start)
            return videos.open(path).num_frames if os.path.isfile(path) else None

        fps = _ek100_rate(videos, chunk_path(0), fps, settings)  # upstream ek100_cls reads chunk 0's rate
        plan = sampling.chunked_clip(clip.start_sec, clip.end_sec, fps, settings["num_frames"], chunk_frame_count,
                                     chunk_len=settings["chunk_len"])
        frames = np.concatenate([videos.read(chunk_path(r.chunk_start), r.frame_ids) for r in plan.reads])
        ids, duration, end = plan.frame_ids, clip.end_sec - clip.start_sec, clip.end_sec
    else:
        video = videos.open(clip.path)
        if settings["sampling"] == "ek100":
            fps = _ek100_rate(videos, clip.path, fps, settings)
        else:
            fps = videos.frame_rate(clip.path, fps)
        start = clip.start_sec or 0.0
        end = clip.end_sec if clip.end_sec is not None else video.num_frames / fps
        if settings["sampling"] == "ek100":
            ids = sampling.whole_video_frame_ids(start, end, fps, settings["num_frames"], video.num_frames)
            duration = end - start  # upstream reports the requested (unclamped) duration
        else:
            first, stop = int(round(start * fps)), min(int(round(end * fps)), video.num_frames)
            # lmms-eval's llava_vid spreads --frames-upbound frames over a folder of frames (MVBench's TVQA
            # clips) whatever its length: a folder is always force-sampled.
            force = settings["force_sample"] or os.path.isdir(clip.path)
            ids = sampling.llava_video_frame_ids(first, stop, fps, settings["frames_upbound"], force,
                                                 settings["video_fps"])
            duration = (stop - first) / fps  # upstream video_time = frames / avg_fps
        ids = [int(i) for i in ids]
        frames = videos.read(clip.path, ids)
    if settings["frame_size"]:
        frames = resize_frames(frames, settings["frame_size"])
    return fs.ClipRecord(
        uid=clip.uid, video_id=clip.video_id, start_sec=float(clip.start_sec or 0.0),
        end_sec=float(clip.end_sec if clip.end_sec is not None else end), fps=float(fps), frame_indices=tuple(ids),
        frames=fs.encode_frames(frames, settings["codec"], settings["jpeg_quality"]), codec=settings["codec"],
        duration_sec=float(duration), extra=clip.extra)


# ------------------------------------------------------------------------------------------------ shards
def plan_shards(clips: list[ClipSpec], clips_per_shard: int) -> list[list[ClipSpec]]:
    """Sort by (video, start, uid) and cut into shards of whole videos holding about ``clips_per_shard`` clips."""
    by_video: dict[str, list[ClipSpec]] = collections.defaultdict(list)
    for clip in sorted(clips, key=lambda c: (c.path, c.start_sec or 0.0, c.uid)):
        by_video[clip.path].append(clip)
    shards, current = [], []
    for video_clips in by_video.values():
        current.extend(video_clips)
        if len(current) >= clips_per_shard:
            shards.append(current)
            current = []
    return shards + ([current] if current else [])


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}{fs.SHARD_SUFFIX}"


def extract_shard(task: tuple[str, str, list[ClipSpec], dict]) -> dict:
    """Worker: write one shard and its ``.done.json`` sidecar; clips that fail are listed, not written."""
    out_dir, name, clips, settings = task
    videos, failures = VideoCache(settings["decoder"]), []
    writer = fs.ShardWriter(os.path.join(out_dir, name))
    try:
        for clip in clips:
            try:
                writer.write(extract_clip(clip, settings, videos))
            except Exception as error:  # one bad video must not stop the run: record it and go on
                failures.append({"uid": clip.uid, "video": clip.path, "shard": name,
                                 "error": f"{type(error).__name__}: {error}"})
            _count_clip()
        entry = writer.commit()
    except BaseException:
        writer.abort()
        raise
    done = {**entry, "failures": failures, "fps_mismatches": videos.fps_mismatches}
    tmp = os.path.join(out_dir, f"{name}{DONE_SUFFIX}.tmp-{os.getpid()}")
    pathlib.Path(tmp).write_text(json.dumps(done))
    os.replace(tmp, os.path.join(out_dir, name + DONE_SUFFIX))
    return done


def _load_done(path: pathlib.Path) -> dict | None:
    """The sidecar of a finished shard, or None if the shard still has to be (re)written: it is missing, does not
    match the shard file, or lists failed clips (retried on every rerun)."""
    done_path = path.with_name(path.name + DONE_SUFFIX)
    if not done_path.is_file():
        return None
    done = json.loads(done_path.read_text())
    complete = path.is_file() and path.stat().st_size == done["num_bytes"] and not done["failures"]
    return done if complete else None


def _prepare_out_dir(out: pathlib.Path, plan: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN_NAME
    ours = [*out.glob(f"shard-*{fs.SHARD_SUFFIX}*"), out / fs.MANIFEST_NAME, out / FAILURES_NAME, plan_path]
    if overwrite:
        for path in ours:
            path.unlink(missing_ok=True)
    elif plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ValueError(f"{out} holds an extraction with other inputs or settings ({plan_path}); "
                         "use a new --out directory, or --overwrite to replace it")
    for stale in out.glob("shard-*.tmp-*"):  # left by an interrupted run
        stale.unlink()
    plan_path.write_text(json.dumps(plan))


def _progress(shards_done: int, shards: int, clips_done: int, clips: int, written: int, failed: int,
              started: float) -> None:
    elapsed = time.time() - started
    rate = clips_done / max(elapsed, 1e-9)
    end = "\r" if sys.stderr.isatty() and shards_done < shards else "\n"
    print(f"[extract-frames] shards {shards_done}/{shards}  clips {clips_done}/{clips} ({written} written, {failed} "
          f"failed)  {rate:.1f} clips/s  {elapsed:.0f} s  {eta(clips_done, clips, rate)}", end=end, file=sys.stderr,
          flush=True)


PROGRESS_EVERY_S = 10.0  # a progress line at least this often, even while one long shard is being written
_clips_done = None  # a shared counter of clips finished, set in every worker by _init_worker


def _init_worker(counter) -> None:
    global _clips_done
    _clips_done = counter


def _count_clip() -> None:
    if _clips_done is not None:
        with _clips_done.get_lock():
            _clips_done.value += 1


def run_extraction(clips: list[ClipSpec], out_dir: str, settings: dict) -> dict:
    """Extract ``clips`` into ``out_dir`` (resuming if it holds the same plan); returns the manifest."""
    uids = collections.Counter(c.uid for c in clips)
    duplicated = [u for u, n in uids.items() if n > 1]
    if duplicated:
        raise ValueError(f"clip uids must be unique; repeated: {duplicated[:5]}")
    shards = plan_shards(clips, settings["clips_per_shard"])
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    content_settings = {k: v for k, v in settings.items() if k not in _RUN_ONLY_SETTINGS}
    out = pathlib.Path(out_dir)
    _prepare_out_dir(out, {"settings": content_settings, "shards": [[c.uid for c in s] for s in shards]},
                     settings.get("overwrite", False))

    results: dict[str, dict] = {n: d for n in names if (d := _load_done(out / n)) is not None}
    pending = [(str(out), n, s, settings) for n, s in zip(names, shards) if n not in results]
    retried = sum((out / (n + DONE_SUFFIX)).is_file() for _, n, _, _ in pending)
    started, written, failed = time.time(), 0, 0
    print(f"[extract-frames] {len(clips)} clips in {len(shards)} shards; {len(results)} shards already done, "
          f"{len(pending)} to write with {settings['workers']} worker(s)"
          + (f" ({retried} retrying failed clips)" if retried else ""), file=sys.stderr)
    # spawn, not fork: the parent may hold JAX / decoder threads, which fork would copy in a broken state.
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    if settings["workers"] > 1 and len(pending) > 1:
        pool = context.Pool(min(settings["workers"], len(pending)), maxtasksperchild=8,  # bounds decord's leaks
                            initializer=_init_worker, initargs=(counter,))
    else:  # in this process, on a thread, so progress still prints while a shard is written
        pool = multiprocessing.pool.ThreadPool(1, initializer=_init_worker, initargs=(counter,))
    total_clips = sum(len(s) for _, _, s, _ in pending)
    try:
        finished = pool.imap_unordered(extract_shard, pending)
        count = 0
        while count < len(pending):
            try:
                done = finished.next(timeout=PROGRESS_EVERY_S)
            except multiprocessing.TimeoutError:
                _progress(count, len(pending), counter.value, total_clips, written, failed, started)
                continue
            count += 1
            results[done["file"]] = done
            written, failed = written + done["num_records"], failed + len(done["failures"])
            _progress(count, len(pending), counter.value, total_clips, written, failed, started)
    finally:
        pool.terminate()
        _init_worker(None)

    entries = [results[n] for n in names]
    failures = [f for e in entries for f in e["failures"]]
    with open(out / FAILURES_NAME, "w") as f:
        f.writelines(json.dumps(failure) + "\n" for failure in failures)
    frames_per_clip = (settings["num_frames"] if settings["sampling"] == "ek100"
                       else settings["frames_upbound"] if settings["force_sample"] and settings["frames_upbound"] > 0
                       else None)
    shard_entries = [{k: e[k] for k in ("file", "num_records", "num_bytes", "uids")} for e in entries]
    mismatches = {path: rate for e in entries for path, rate in e.get("fps_mismatches", {}).items()}
    fs.write_manifest(out, shard_entries, content_settings, frames_per_clip, num_failed_clips=len(failures),
                      extra={"fps_mismatches": mismatches} if mismatches else None)
    return fs.read_manifest(out)


# ------------------------------------------------------------------------------------------------ command line
DESCRIPTION = """\
Decode video clips once into ArrayRecord frame shards (one record per clip: uid, video id, start/end seconds,
fps, sampled frame indices, JPEG or PNG frames) plus manifest.json, which training and evaluation read instead of
the videos.

Sources (one of):
  --ek100-csv CSV [CSV ...]  EPIC-KITCHENS-100 annotation CSVs; clip uid = narration_id, video id "P01-P01_01".
                             Videos under --video-root as {root}/{pid}/videos/{vid}.MP4 (--layout whole) or
                             AVION 15-second chunks {root}/{pid}/{vid}.MP4/{chunk_start}.MP4 (--layout chunked,
                             upstream LLaVAction's layout).
  --jsonl FILE               one JSON object per line: {"video": path relative to --video-root, "start": s,
                             "end": s, "uid": name}; start/end/uid optional (whole video; uid defaults to
                             "{video}" or "{video}_{start:.2f}_{end:.2f}"). Other keys are kept in the record.
                             A video may be any file decord or PyAV reads (MP4, WebM, GIF, ...) or a folder
                             of JPEG / PNG frames, read in name order at 3 fps (lmms-eval's rule for MVBench).
                             With --sampling ek100 --layout chunked, "video" is the {pid}/{vid}.MP4 folder of
                             chunks (build-train's clips.jsonl).

Sampling (--sampling; default ek100 for CSVs, llava-video for JSONL):
  ek100        upstream get_frame_ids: midpoints of --num-frames equal segments of
               [round(start*fps), round(end*fps)], end clamped to the last frame, fps = the video's own
               rate from its container (upstream's re-encodes: 30; the original EK100 videos: 50 or 59.94).
               --fps N only states the rate you expect: a video that disagrees is warned about and listed
               in manifest.json's fps_mismatches {video: its rate}.
  llava-video  upstream LLaVA-Video: every round(avg_fps / --video-fps)-th frame, switching to
               --frames-upbound frames spread with np.linspace when there are more (or with --force-sample,
               and always for a folder of frames, as lmms-eval's llava_vid reads MVBench's). Without
               --force-sample a short video keeps fewer frames; eval pads them per clip.

Frames are stored squashed to --frame-size x --frame-size with PIL bicubic (upstream's SigLIP preprocessing;
0 keeps the source size). Decoding uses decord, falling back to PyAV (--decoder). Work runs in --workers
processes over shards of whole videos. Rerunning the same command resumes: finished shards are skipped. A video
that cannot be read is listed in failures.jsonl and the run continues.

Exit status: 0 all clips written; 3 some clips failed (see failures.jsonl); 2 bad arguments or inputs.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ek100-csv", nargs="+", metavar="CSV", help="EK100 annotation CSV file(s)")
    source.add_argument("--jsonl", metavar="FILE", help="JSONL list of clips {video, start?, end?, uid?}")
    parser.add_argument("--video-root", required=True, help="directory the video paths are relative to")
    cli_flags.add_out(parser, "output directory for shards, manifest.json, failures.jsonl")
    parser.add_argument("--layout", choices=("whole", "chunked"), default="whole",
                        help="EK100 video layout: whole {pid}/videos/{vid}.MP4 or chunked {pid}/{vid}.MP4/{s}.MP4 "
                             "(default: whole)")
    parser.add_argument("--chunk-len", type=int, default=sampling.CHUNK_SECONDS,
                        help="seconds per chunk file in the chunked layout (default: %(default)s)")
    parser.add_argument("--sampling", choices=("ek100", "llava-video"),
                        help="frame sampling rule (default: ek100 for --ek100-csv, llava-video for --jsonl)")
    cli_flags.add_num_frames(parser, "ek100 rule: upstream's clip_length (16 eval, 64 final "
                                     "training; default: %(default)s)", default=16)
    parser.add_argument("--fps", default="video",
                        help="frame numbers always use each video's own rate from its container (EK100 originals "
                             "run at 50 or 59.94 fps, upstream's re-encodes at 30); a number is the rate you "
                             "expect: a video that disagrees is warned about and listed in the manifest's "
                             "fps_mismatches (default: %(default)s)")
    parser.add_argument("--assume-fps", type=float, default=None, metavar="N",
                        help="ek100 rule: number frames at N fps whatever the container says, for parity with "
                             "upstream's EK100 training loader (avion_video_loader's default fps=30, whatever the "
                             "chunks' rate); videos at another rate are listed in fps_mismatches (default: each "
                             "video's own rate)")
    parser.add_argument("--frames-upbound", type=int, default=64,
                        help="llava-video rule: most frames per clip, 0 = no cap (default: %(default)s)")
    parser.add_argument("--force-sample", action="store_true",
                        help="llava-video rule: always take exactly --frames-upbound frames (frame folders "
                             "always do)")
    parser.add_argument("--video-fps", type=float, default=1.0,
                        help="llava-video rule: frames per second to sample (default: %(default)s)")
    parser.add_argument("--frame-size", type=int, default=DEFAULT_FRAME_SIZE,
                        help="store frames squashed to this square size, 0 = source size (default: %(default)s)")
    parser.add_argument("--codec", choices=fs.CODECS, default="jpeg",
                        help="frame encoding: jpeg (lossy, small) or png (lossless: upstream's per-step decoding "
                             "gives the same pixels bit for bit) (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=fs.DEFAULT_JPEG_QUALITY,
                        help="JPEG quality 1-100 (default: %(default)s)")
    parser.add_argument("--decoder", choices=("auto", "decord", "pyav"), default="auto",
                        help="video decoder; auto = decord with PyAV fallback (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel worker processes (default: %(default)s)")
    parser.add_argument("--clips-per-shard", type=int, default=256,
                        help="about this many clips per shard; a video never spans shards (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="extract only the first N clips (a trial run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an extraction with other inputs or settings already in --out")


def settings_from_args(args: argparse.Namespace) -> dict:
    sampling_rule = args.sampling or ("ek100" if args.ek100_csv else "llava-video")
    if args.layout == "chunked" and sampling_rule != "ek100":
        raise ValueError("--layout chunked needs the ek100 sampling rule")
    if args.fps == "video" or sampling_rule == "llava-video":
        fps = None  # read from each video (llava-video always uses the video's own rate, as upstream)
    else:
        try:
            fps = float(args.fps)
        except ValueError:
            raise ValueError(f'--fps must be a number or "video", got {args.fps!r}') from None
    if args.assume_fps is not None and (sampling_rule != "ek100" or args.assume_fps <= 0):
        raise ValueError("--assume-fps goes with the ek100 sampling rule and must be positive")
    if args.num_frames < 1 or args.workers < 1 or args.clips_per_shard < 1 or not 1 <= args.jpeg_quality <= 100:
        raise ValueError("--num-frames, --workers and --clips-per-shard must be >= 1, --jpeg-quality in 1..100")
    return {
        "source": {"ek100_csv": args.ek100_csv, "jsonl": args.jsonl, "video_root": args.video_root},
        "layout": args.layout, "chunk_len": args.chunk_len, "sampling": sampling_rule, "num_frames": args.num_frames,
        "fps": fps, "frames_upbound": args.frames_upbound, "force_sample": args.force_sample,
        "video_fps": args.video_fps, "frame_size": args.frame_size, "codec": args.codec,
        "jpeg_quality": args.jpeg_quality, "decoder": args.decoder, "clips_per_shard": args.clips_per_shard,
        "limit": args.limit, "workers": args.workers, "overwrite": args.overwrite,
        # only when given, so extractions made before the flag existed still resume
        **({"assume_fps": args.assume_fps} if args.assume_fps is not None else {}),
    }


def run(args: argparse.Namespace) -> int:
    started = time.time()
    settings = settings_from_args(args)
    if args.ek100_csv:
        clips = [c for path in args.ek100_csv for c in read_ek100_csv(path, args.video_root, args.layout)]
    else:
        clips = read_clip_jsonl(args.jsonl, args.video_root)
    clips = clips[: args.limit] if args.limit else clips
    with locks.output_lock(args.out, "extract-frames", log=lambda text: print(text, file=sys.stderr)):
        manifest = run_extraction(clips, args.out, settings)
    failed = manifest["num_failed_clips"]
    frames = (manifest["frames_per_clip"] or 0) * manifest["num_clips"]
    print(f"extract-frames: {manifest['num_clips']} clips{f' ({frames} frames)' if frames else ''} in "
          f"{len(manifest['shards'])} shards at {args.out}, {time.time() - started:.1f} s; "
          + (f"{failed} clips FAILED, listed in {pathlib.Path(args.out) / FAILURES_NAME}" if failed else "no failures"))
    return EXIT_SOME_FAILED if failed else 0
