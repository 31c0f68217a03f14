"""A small synthetic egocentric-action dataset in EPIC-KITCHENS-100 format, written as real MP4 files.

Each action segment shows one object on a kitchen-counter background. The noun is the object (its colour and
shape: a red square "cup", a green disc "plate", a blue bar "knife", a yellow triangle "bowl"); the verb is its
motion ("take": up, "put": down, "push": right, "pull": left). Segments follow each other in a few videos per
participant, laid out like EK100 (`{root}/{pid}/videos/{vid}.MP4`), with the annotation CSVs the EK100 tools
read: EPIC_100_train.csv, EPIC_100_validation.csv and the verb / noun class lists.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

VERBS = {"take": (0, -1), "put": (0, 1), "push": (1, 0), "pull": (-1, 0)}  # motion (dx, dy) in image axes
NOUNS = {"cup": ((220, 40, 40), "square"), "plate": ((40, 190, 60), "disc"), "knife": ((40, 80, 230), "bar"),
         "bowl": ((235, 205, 40), "triangle")}
CSV_COLUMNS = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
               "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class",
               "all_nouns", "all_noun_classes"]


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    segments_per_action_train: int = 12
    segments_per_action_val: int = 4
    frame_size: int = 96
    fps: int = 30
    segment_seconds: float = 1.2
    seed: int = 0


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "disc":
        return xx**2 + yy**2 <= 1
    if shape == "bar":
        return np.abs(yy) <= 0.3
    return yy >= 2 * np.abs(xx) - 1  # triangle pointing up


def render_segment(verb: str, noun: str, n_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n_frames, size, size, 3) uint8: the object moving across a textured counter, trailing a motion blur."""
    background = np.full((size, size, 3), (150, 130, 110), np.int16)
    background += rng.integers(-12, 13, (size, size, 1), dtype=np.int16)  # a little texture, not a flat colour
    colour, shape = NOUNS[noun]
    obj = size // 4
    mask = _shape_mask(shape, obj)
    dx, dy = VERBS[verb]
    travel = 3 * size // 5
    x0 = rng.integers(obj, size - 2 * obj) if dx == 0 else (size // 4 - obj // 2 if dx > 0 else 3 * size // 4 - obj // 2)
    y0 = rng.integers(obj, size - 2 * obj) if dy == 0 else (size // 4 - obj // 2 if dy > 0 else 3 * size // 4 - obj // 2)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    colour = np.asarray(colour, np.float32)
    for i in range(n_frames):
        t = i / max(n_frames - 1, 1)
        frame = background.astype(np.float32)
        # A fading trail behind the object, like motion blur: the direction is visible in every frame.
        for lag, alpha in ((0.3, 0.25), (0.2, 0.45), (0.1, 0.7), (0.0, 1.0)):
            tt = max(t - lag, 0.0)
            x, y = int(x0 + dx * travel * tt), int(y0 + dy * travel * tt)
            region = frame[y : y + obj, x : x + obj]
            m = mask[: region.shape[0], : region.shape[1]]
            region[m] = (1 - alpha) * region[m] + alpha * colour
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _timestamp(seconds: float) -> str:
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:05.2f}"


def write_dataset(root: str | pathlib.Path, spec: SyntheticSpec = SyntheticSpec()) -> dict:
    """Write videos and CSVs under `root`; returns counts. Train and validation use different participants."""
    import av  # PyAV: optional dependency, needed only to write the demo videos

    root = pathlib.Path(root)
    rng = np.random.default_rng(spec.seed)
    actions = [(v, n) for v in VERBS for n in NOUNS]
    n_seg_frames = int(round(spec.segment_seconds * spec.fps))
    gap = 6  # frames of empty counter between segments
    splits = {"train": ("P01", "P02"), "validation": ("P03",)}
    per_action = {"train": spec.segments_per_action_train, "validation": spec.segments_per_action_val}
    counts = {}
    for split, participants in splits.items():
        order = [a for a in actions for _ in range(per_action[split])]
        rng.shuffle(order)
        rows = []
        chunks = np.array_split(np.arange(len(order)), len(participants) * 2)  # two videos per participant
        for v_idx, chunk in enumerate(chunks):
            pid = participants[v_idx // 2]
            vid = f"{pid}_{v_idx % 2 + 1:02d}"
            path = root / "videos" / pid / "videos" / f"{vid}.MP4"
            path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(path), "w") as container:
                stream = container.add_stream("libx264", rate=spec.fps, options={"crf": "18", "preset": "ultrafast"})
                stream.width = stream.height = spec.frame_size
                stream.pix_fmt = "yuv420p"
                frame_no = 0

                def emit(frames):
                    nonlocal frame_no
                    for f in frames:
                        for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                            container.mux(packet)
                        frame_no += 1

                for k, seg in enumerate(chunk):
                    verb, noun = order[seg]
                    emit(np.full((gap, spec.frame_size, spec.frame_size, 3), 140, np.uint8))
                    start = frame_no
                    emit(render_segment(verb, noun, n_seg_frames, spec.frame_size, rng))
                    end = frame_no
                    rows.append({
                        "narration_id": f"{vid}_{k}", "participant_id": pid, "video_id": vid,
                        "narration_timestamp": _timestamp(start / spec.fps), "start_timestamp": _timestamp(start / spec.fps),
                        "stop_timestamp": _timestamp(end / spec.fps), "start_frame": start + 1, "stop_frame": end,
                        "narration": f"{verb} {noun}", "verb": verb, "verb_class": list(VERBS).index(verb),
                        "noun": noun, "noun_class": list(NOUNS).index(noun), "all_nouns": f"['{noun}']",
                        "all_noun_classes": f"[{list(NOUNS).index(noun)}]"})
                emit(np.full((gap, spec.frame_size, spec.frame_size, 3), 140, np.uint8))
                for packet in stream.encode():
                    container.mux(packet)
        name = "EPIC_100_train.csv" if split == "train" else "EPIC_100_validation.csv"
        _write_csv(root / "annotations" / name, CSV_COLUMNS, rows)
        counts[split] = len(rows)
    _write_csv(root / "annotations" / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
               [{"id": i, "key": v, "instances": f"['{v}']", "category": "motion"} for i, v in enumerate(VERBS)])
    for name in ("EPIC_100_noun_classes.csv", "EPIC_100_noun_classes_v2.csv"):
        _write_csv(root / "annotations" / name, ["id", "key", "instances", "category"],
                   [{"id": i, "key": n, "instances": f"['{n}']", "category": "object"} for i, n in enumerate(NOUNS)])
    return counts


def _write_csv(path: pathlib.Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
