"""Prior actions at test time: the two previous actions of the same video named in the MC prompt, as upstream's
evaluation does with ``--learn_neighbor_actions prior --test_type temporal_cot_oracle | temporal_cot_pseudo``
(llavaction/action/ek_eval.py: evaluate_on_EK100; llavaction/action/generate_interval_pred.py: get_lookup_dict,
get_pseudo_dict; the prompt: llavaction/action/utils.py: format_task_related_prompt, upstream @bd9f465).

* The lookup table comes from the validation CSV itself: per video, segments sorted by end time; a segment whose two
  predecessors each end at most 3 s before the next one starts gets them (``prior_action_table``, the same
  rule as training). A clip without such predecessors keeps the plain MC prompt, as upstream's
  ``lookup_table.get(uid)`` returning None does.
* ``oracle``: the predecessors' ground-truth texts (their narrations; ``"verb_key noun_key"`` for official_key).
* ``pseudo``: what the model answered for the predecessors in an earlier ``eval`` run of the same question set
  (``predictions.jsonl``: the parsed generation, upstream's ``llava_pred``; the chosen option's text for a
  score-only run), or upstream's own ``prediction*.json`` files from ``--pseudo_folder``. The offsets stay the
  annotated ones, as upstream's.
* At test time every clip with predecessors gets the prior-actions prompt (training draws it with probability 0.3).

Upstream builds the table only for ``GT_random_narration`` and ``official_key`` (``get_annotated_intervals``
appends no text for any other representation, and the lookup then fails); so do we, with a clear error.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from collections import defaultdict

from llavaction_jax.ek100 import labels

MODES = ("none", "oracle", "pseudo")
TABLE_REPRESENTATIONS = ("GT_random_narration", "official_key")  # get_annotated_intervals' two branches
RECORD_KEYS = ("prev2_id", "prev2_offset", "prev2_narration", "prev1_id", "prev1_offset", "prev1_narration")


def prior_action_key(video: str, start: float, end: float) -> str:
    """Upstream's lookup key ``f"{video}_{round(start,2)}_{round(end,2)}"`` (Python float repr: ``3.0``)."""
    return f"{video}_{round(start, 2)}_{round(end, 2)}"


def prior_action_table(segments: list[labels.Segment], maps: labels.LabelMaps, representation: str,
                       max_gap: float = 3.0) -> dict[str, dict]:
    """Upstream's ``get_lookup_dict``: the two previous actions of every segment that has close predecessors.

    Per video, segments sorted by end time (stable); for each consecutive triple whose gaps (next start - previous
    end) are both at most ``max_gap`` seconds, the third segment's key maps to the first two narrations and their
    start offsets. Narrations are raw (``*narration`` representations) or ``"verb_key noun_key"`` (official_key).
    """
    by_video: dict[str, list[labels.Segment]] = defaultdict(list)
    for segment in segments:
        by_video[segment.video].append(segment)

    def name(s: labels.Segment) -> str:
        return maps.key_text(s.vn) if representation == "official_key" else s.narration

    table = {}
    for video, items in by_video.items():
        items = sorted(items, key=lambda s: s.end)
        for prev2, prev1, cur in zip(items, items[1:], items[2:]):
            if prev1.start - prev2.end <= max_gap and cur.start - prev1.end <= max_gap:
                table[prior_action_key(video, cur.start, cur.end)] = {
                    "prev2_narration": name(prev2), "prev2_offset": round(cur.start - prev2.start, 2),
                    "prev1_narration": name(prev1), "prev1_offset": round(cur.start - prev1.start, 2),
                    "cur_narration": name(cur),
                    # which segments these are (test-time pseudo prior actions look their predictions up)
                    "prev2_id": prev2.narration_id, "prev1_id": prev1.narration_id,
                    "prev2_key": prior_action_key(video, prev2.start, prev2.end),
                    "prev1_key": prior_action_key(video, prev1.start, prev1.end)}
    return table



def oracle_table(segments: list[labels.Segment], maps: labels.LabelMaps, representation: str) -> dict[str, dict]:
    """The test-time lookup table of the validation segments (keys: ``prior_action_key`` of each segment)."""
    if representation not in TABLE_REPRESENTATIONS:
        raise ValueError(f"prior actions need --representation {' or '.join(TABLE_REPRESENTATIONS)} (upstream's "
                         f"get_lookup_dict has no text for {representation!r})")
    return prior_action_table(segments, maps, representation)


def lookup(table: dict[str, dict], segment: labels.Segment) -> dict | None:
    """The prior-action record of a segment (upstream's key: video, start and end rounded to 2 decimals), or None."""
    entry = table.get(prior_action_key(segment.video, segment.start, segment.end))
    return None if entry is None else {k: entry[k] for k in RECORD_KEYS} | {
        "prev2_key": entry["prev2_key"], "prev1_key": entry["prev1_key"]}


class PseudoPredictions:
    """An earlier run's answer text per clip, by question uid (narration id) or by upstream's time key."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.by_uid: dict[str, str] = {}
        self.by_key: dict[str, str] = {}
        if self.path.is_dir():
            self._read_upstream_folder()
        elif self.path.is_file():
            self._read_predictions_jsonl()
        else:
            raise FileNotFoundError(f"{self.path}: no predictions.jsonl of an earlier eval run (or folder of "
                                    "upstream's prediction*.json files)")

    def _read_predictions_jsonl(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.by_uid[str(record["uid"])] = answer_text(record)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{self.path}:{line_number}: not a prediction record of eval "
                                     f"({type(e).__name__}: {e})") from None

    def _read_upstream_folder(self) -> None:
        files = sorted(glob.glob(os.path.join(self.path, "prediction*.json")))
        if not files:
            raise FileNotFoundError(f"{self.path}: no prediction*.json files (upstream's --pseudo_folder layout)")
        for file in files:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            for index, v in data.items():
                try:  # get_pseudo_dict's key
                    key = prior_action_key(str(v["vid_path"]).replace("/", "-"), float(v["start_second"]),
                                           float(v["end_second"]))
                    self.by_key[key] = str(v["llava_pred"])
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{file}: entry {index!r} is not upstream's prediction record ({e})") from None

    def text(self, uid: str, key: str, needed_by: str) -> str:
        if uid in self.by_uid:
            return self.by_uid[uid]
        if key in self.by_key:
            return self.by_key[key]
        raise ValueError(f"{self.path}: no prediction for {uid} ({key}), the previous action of {needed_by}; the "
                         "pseudo prior actions need an earlier run over the whole question set")


def answer_text(record: dict) -> str:
    """What a prediction record answered: the parsed generation (upstream's ``llava_pred``), else the text of the
    option that scored highest."""
    if "generate" in record:
        return str(record["generate"]["parsed"])
    letter = record["score"]["letter"]
    for option in record["options"]:
        if option.split(". ", 1)[0] == letter:
            return option.split(". ", 1)[-1]
    raise ValueError(f"score letter {letter!r} is not an option")


def with_pseudo(prior: dict, predictions: PseudoPredictions, uid: str) -> dict:
    """``prior`` with the two previous narrations replaced by the model's earlier answers for those clips."""
    return {**prior,
            "prev2_narration": predictions.text(prior["prev2_id"], prior["prev2_key"], uid),
            "prev1_narration": predictions.text(prior["prev1_id"], prior["prev1_key"], uid)}
