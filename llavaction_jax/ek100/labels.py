"""EPIC-KITCHENS-100 annotations: CSV loading, label maps, action representations, prediction files.

Follows upstream's `generate_label_map` / `parse_vn_ids` (llavaction/action/utils.py):
* an action is the string ``"verb_class:noun_class"`` ("v:n"); action ids number the v:n strings of train + validation
  sorted **as strings** by Python's ``sorted`` ("0:10" < "0:2" < "10:1" < "1:0": ':' sorts after the digits), which is
  how the released action heads were trained (an order that puts "1:0" before "10:1" is not
  what ``sorted`` does; docs/ek100.md);
* ``vn2narrations[vn]`` lists every narration of that pair, train rows first, with repetitions, so a uniform draw
  from it is frequency-weighted like upstream's ``random.choice``;
* noun keys ``"a:b:c"`` read ``"b c a"`` (``"pan:frying"`` -> ``"frying pan"``).

Columns are read by header name (not by position as upstream does) so a malformed file fails with the file, line and
column named instead of silently reading the wrong field.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib
import re
from collections import Counter

import numpy as np

ANNOTATION_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
                      "narration", "verb", "verb_class", "noun", "noun_class")
VALIDATION_CSV = "EPIC_100_validation.csv"
TRAIN_CSV = "EPIC_100_train.csv"
# Labelled train-split rows published with the UDA challenge; they stand in for EPIC_100_train.csv where that file
# is missing (about 43% of the train segments, see docs/ek100.md). None of them overlap validation.
UDA_TRAIN_STAND_INS = ("UDA_annotations/EPIC_100_uda_source_train.csv",
                       "UDA_annotations/EPIC_100_uda_source_val.csv",
                       "UDA_annotations/EPIC_100_uda_target_val.csv")
# Action ids index the released 3806-way action head, defined by EPIC_100_train.csv (+ validation). "uda" asks
# for the UDA stand-ins explicitly: a different label space (2684 actions), so other ids, distractors and options.
LABEL_SPACES = ("ek100", "uda")
VERB_CLASSES_CSV = "EPIC_100_verb_classes.csv"
NOUN_CLASSES_CSV = "EPIC_100_noun_classes_v2.csv"  # upstream reads v2 (llavaction/action/utils.py:101-102 @bd9f465)

REPRESENTATIONS = ("GT_random_narration", "official_key", "random_narration", "top1_narration", "GT_key",
                   "topk_narration_cut_key")
EXAMPLES_MARKER = "example usages could be"  # topk_narration_*: between the key and the narrations (parse_vn_ids)
_VN_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class AnnotationError(ValueError):
    """A bad annotation CSV or prediction file; the message names the file, line/key and column."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """One annotated action segment (a CSV row)."""

    row_index: int  # 0-based data-row index in its file: the key of AVION/TIM prediction files
    narration_id: str  # unique per row, used as the question uid
    participant_id: str
    video_id: str
    start: float  # seconds, upstream's datetime2sec of start_timestamp
    end: float
    narration: str
    verb: str
    verb_class: int
    noun: str
    noun_class: int
    source: str = ""  # file it came from, for error messages

    @property
    def vn(self) -> str:
        return f"{self.verb_class}:{self.noun_class}"

    @property
    def video(self) -> str:
        """Upstream's video key ``"P01-P01_11"`` (participant folder + video id)."""
        return f"{self.participant_id}-{self.video_id}"


def datetime2sec(timestamp: str) -> float:
    """``"HH:MM:SS.ss"`` -> seconds, with upstream's arithmetic (int hours/minutes + float seconds)."""
    hh, mm, ss = timestamp.split(":")
    return int(hh) * 3600 + int(mm) * 60 + float(ss)


def read_annotation_csv(path: str | pathlib.Path) -> list[Segment]:
    """Read an EK100 annotation CSV (validation / train / UDA layout) into segments, validating every row."""
    path = pathlib.Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: annotation CSV not found")
    segments = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        for row_index, row in enumerate(reader):
            line = row_index + 2  # 1-based, after the header
            where = f"{path}:{line} (narration_id {row.get('narration_id')!r})"
            if None in row.values():
                raise AnnotationError(f"{where}: row has fewer fields than the header")
            try:
                start, end = datetime2sec(row["start_timestamp"]), datetime2sec(row["stop_timestamp"])
            except ValueError:
                raise AnnotationError(f"{where}: start_timestamp/stop_timestamp must be HH:MM:SS.ss, got "
                                      f"{row['start_timestamp']!r} / {row['stop_timestamp']!r}") from None
            classes = {}
            for column in ("verb_class", "noun_class"):
                try:
                    classes[column] = int(row[column])
                except ValueError:
                    raise AnnotationError(f"{where}: column {column!r} must be an integer, got {row[column]!r}") \
                        from None
            segments.append(Segment(row_index, row["narration_id"], row["participant_id"], row["video_id"], start,
                                    end, row["narration"], row["verb"], classes["verb_class"], row["noun"],
                                    classes["noun_class"], str(path)))
    return segments


def read_class_keys(path: str | pathlib.Path, reorder_colon_parts: bool) -> dict[int, str]:
    """``id -> key`` from EPIC_100_verb_classes.csv / EPIC_100_noun_classes_v2.csv.

    Noun keys are re-ordered (``reorder_colon_parts``): ``"pan:frying"`` -> ``"frying pan"``
    (llavaction/action/utils.py:109-114 @bd9f465).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: class CSV not found")
    keys = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"id", "key"} <= set(reader.fieldnames or []):
            raise AnnotationError(f"{path}: needs columns 'id' and 'key'; header is {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                class_id = int(row["id"])
            except ValueError:
                raise AnnotationError(f"{path}:{line}: column 'id' must be an integer, got {row['id']!r}") from None
            parts = row["key"].split(":")
            keys[class_id] = " ".join(parts[1:] + parts[:1]) if reorder_colon_parts else row["key"]
    return keys


@dataclasses.dataclass
class LabelMaps:
    """Upstream's label space: action ids, narration lists and class keys."""

    vn2act: dict[str, int]  # "v:n" -> action id, lexicographic order of the strings
    vn2narrations: dict[str, list[str]]  # every narration of the pair, train then val, file order, repeats kept
    verb_keys: dict[int, str]
    noun_keys: dict[int, str]

    @property
    def actions(self) -> list[str]:
        """The v:n strings in action-id order."""
        return list(self.vn2act)

    def top_narrations(self, vn: str) -> list[str]:
        """Unique narrations of ``vn``, most frequent first (ties: first seen), upstream's ``labels[vn]``."""
        return [text for text, _ in Counter(self.vn2narrations[vn]).most_common()]

    def key_text(self, vn: str) -> str:
        """``official_key`` rendering, e.g. ``"turn-on tap"``."""
        verb, noun = split_vn(vn)
        if verb not in self.verb_keys or noun not in self.noun_keys:
            raise AnnotationError(f"action {vn!r}: verb {verb} or noun {noun} not in the class CSVs")
        return f"{self.verb_keys[verb]} {self.noun_keys[noun]}"


def action_ids_in_lexicographic_order(vns) -> dict[str, int]:
    """Upstream's ``mapping_vn2act``: ids follow the *string* sort of the unique v:n keys."""
    return {vn: i for i, vn in enumerate(sorted(set(vns)))}


def build_label_maps(train: list[Segment], validation: list[Segment], verb_keys: dict[int, str],
                     noun_keys: dict[int, str]) -> LabelMaps:
    """Label maps from train rows then validation rows (the order matters for the narration lists)."""
    vn2narrations: dict[str, list[str]] = {}
    for segment in [*train, *validation]:
        vn2narrations.setdefault(segment.vn, []).append(segment.narration)
    return LabelMaps(action_ids_in_lexicographic_order(vn2narrations), vn2narrations, verb_keys, noun_keys)


def default_train_csvs(annotation_dir: str | pathlib.Path, label_space: str = "ek100") -> list[pathlib.Path]:
    """The train CSVs of a label space: "ek100" = EPIC_100_train.csv (refused with a one-line error naming it
    when missing: the released action head is defined by it), "uda" = the labelled UDA train-split files."""
    annotation_dir = pathlib.Path(annotation_dir)
    if label_space not in LABEL_SPACES:
        raise AnnotationError(f"label space {label_space!r}; expected one of {LABEL_SPACES}")
    if label_space == "ek100":
        if not (annotation_dir / TRAIN_CSV).exists():
            raise AnnotationError(f"{annotation_dir / TRAIN_CSV} not found: action ids index the 3806-way head it "
                                  "defines; pass --label-space uda to use the UDA train files instead (2684 actions, "
                                  "other ids)")
        return [annotation_dir / TRAIN_CSV]
    stand_ins = [annotation_dir / name for name in UDA_TRAIN_STAND_INS]
    missing = [str(p) for p in stand_ins if not p.exists()]
    if missing:
        raise AnnotationError(f"--label-space uda: {', '.join(missing)} not found")
    return stand_ins


def load_label_maps(annotation_dir: str | pathlib.Path, train_csvs=None, validation_csv=None,
                    label_space: str = "ek100") -> LabelMaps:
    """Label maps from an annotation folder (train CSVs default to :func:`default_train_csvs` of `label_space`)."""
    annotation_dir = pathlib.Path(annotation_dir)
    train_csvs = default_train_csvs(annotation_dir, label_space) if not train_csvs else train_csvs
    train = [s for path in train_csvs for s in read_annotation_csv(path)]
    validation = read_annotation_csv(validation_csv or annotation_dir / VALIDATION_CSV)
    return build_label_maps(train, validation, read_class_keys(annotation_dir / VERB_CLASSES_CSV, False),
                            read_class_keys(annotation_dir / NOUN_CLASSES_CSV, True))


def split_vn(vn: str) -> tuple[int, int]:
    match = _VN_PATTERN.match(vn) if isinstance(vn, str) else None
    if not match:
        raise AnnotationError(f"action {vn!r} is not of the form 'verb_class:noun_class'")
    return int(match.group(1)), int(match.group(2))


def render_action(vn: str, representation: str, maps: LabelMaps, rng: np.random.Generator, gt_vn: str | None = None,
                  gt_narration: str | None = None, avoid: frozenset | set = frozenset(), n_narrations: int = -1) -> str:
    """One option text for action ``vn`` (upstream's ``parse_vn_ids``).

    ``GT_*``: the ground-truth pair renders as the clip's own narration. ``*random_narration``: a frequency-weighted
    draw from the pair's narrations; texts in ``avoid`` (options already rendered for the question) are skipped so a
    question never shows the same text twice (upstream can, which makes exact-text scoring ambiguous). When every
    narration of the pair is taken, or the pair has none (a prediction outside our label maps), the official key
    text is used instead. ``*key``: ``"verb_key noun_key"`` (``GT_key``: the GT still shows its narration).
    ``topk_narration_cut_key``: ``"verb_key noun_key, example usages could be, n1, ..., nk"`` with the pair's
    ``n_narrations`` most frequent narrations (upstream's "cut" spaCy pass returns the text unchanged).
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown action representation {representation!r}; expected one of {REPRESENTATIONS}")
    if "GT" in representation and vn == gt_vn:
        return gt_narration
    if representation == "topk_narration_cut_key":
        if n_narrations <= 0:
            raise ValueError("the topk_narration_cut_key representation needs n_narrations > 0 (upstream asserts it)")
        top = maps.top_narrations(vn)[:n_narrations] if vn in maps.vn2narrations else []
        return ", ".join([maps.key_text(vn), EXAMPLES_MARKER, *top])
    if representation in ("official_key", "GT_key"):
        return maps.key_text(vn)
    narrations = maps.vn2narrations.get(vn, [])
    if representation == "top1_narration":
        candidates = [t for t in (maps.top_narrations(vn) if narrations else []) if t not in avoid]
        return candidates[0] if candidates else maps.key_text(vn)
    candidates = [t for t in narrations if t not in avoid]
    if not candidates:
        return maps.key_text(vn)
    return candidates[int(rng.integers(len(candidates)))]


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def item_rng(seed: int, uid: str, *salt: str | int) -> np.random.Generator:
    """The RNG of one question/sample: a function of (seed, uid, salt) only.

    Upstream draws every question from one global stream, so its benchmark depends on the order and number of
    processes (``random.seed(42)`` at import of llavaction/action/utils.py; llavaction/action/ek_eval.py:
    evaluate_on_EK100). Deriving each item's stream from its uid makes the output independent of
    process count, slicing and iteration order.
    """
    entropy = [int(seed), stable_hash(uid)] + [stable_hash(s) if isinstance(s, str) else int(s) for s in salt]
    return np.random.default_rng(entropy)


@dataclasses.dataclass(frozen=True)
class ActionPredictions:
    """One entry of an AVION / TIM prediction file: ranked "v:n" ids (best first) and the stored target."""

    predictions: tuple[str, ...]
    target: str | None


def load_predictions(path: str | pathlib.Path) -> dict[int, ActionPredictions]:
    """Read ``{"<row index>": {"predictions": ["v:n", ...], "target": "v:n"}, ...}`` (as upstream
    llavaction/action/dataset.py: VideoMultiChoiceDataset reads it)."""
    path = pathlib.Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: prediction file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object keyed by CSV row index, got {type(data).__name__}")
    out = {}
    for key, entry in data.items():
        where = f"{path}: entry {key!r}"
        if not key.isdigit():
            raise AnnotationError(f"{where}: keys must be CSV row indices ('0', '1', ...)")
        if not isinstance(entry, dict) or not isinstance(entry.get("predictions"), list):
            raise AnnotationError(f"{where}: expected an object with a 'predictions' list of 'v:n' strings")
        try:
            ranked = tuple("%d:%d" % split_vn(vn) for vn in entry["predictions"])
            target = "%d:%d" % split_vn(entry["target"]) if entry.get("target") is not None else None
        except AnnotationError as e:
            raise AnnotationError(f"{where}: {e}") from None
        out[int(key)] = ActionPredictions(ranked, target)
    return out


def predictions_for(segment: Segment, predictions: dict[int, ActionPredictions], path: str,
                    min_count: int) -> list[str]:
    """The ranked prediction list of ``segment``, checked against the row (missing key, wrong target, too short)."""
    where = f"{path}: entry '{segment.row_index}' (uid {segment.narration_id}, {segment.source})"
    entry = predictions.get(segment.row_index)
    if entry is None:
        raise AnnotationError(f"{where}: no predictions for this CSV row")
    if entry.target is not None and entry.target != segment.vn:
        raise AnnotationError(f"{where}: target {entry.target} differs from the row's verb:noun {segment.vn}; is the "
                              "file for another CSV or split?")
    if len(entry.predictions) < min_count:
        raise AnnotationError(f"{where}: {len(entry.predictions)} predictions, need at least {min_count}")
    return list(entry.predictions)
