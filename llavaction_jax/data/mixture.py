"""Training data mixtures: upstream's data YAML and LLaVA conversation JSON / JSONL files -> one list of samples.

Accepted ``data_path`` forms (upstream ``LazySupervisedDataset.__init__``, llavaction/train/train.py:998-1066 @bd9f465):

* ``mix.yaml``::

      datasets:
        - json_path: /data/ek100_mc.jsonl     # .jsonl (one JSON object per line) or .json (a list of objects)
          sampling_strategy: all              # all | first:N | end:N | random:N | first:P% | end:P% | random:P%

  Lists are concatenated in YAML order. ``P%`` keeps ``ceil(P * len / 100)`` samples; ``random`` shuffles the file
  and keeps the first N (seeded here, so a mixture is the same list on every host and every run; upstream used the
  global ``random`` state). A relative ``json_path`` is read relative to the YAML file's directory.
* ``/data/{a,b}.json``: the brace list expanded, files concatenated in order.
* one ``.json`` or ``.jsonl`` file.

Two deliberate differences from upstream, both where upstream silently did something else than asked: an unknown
strategy (e.g. a bare ``"50%"``, which upstream reads as ``all``) is an error, and ``end:0`` keeps nothing (upstream's
``data[-0:]`` keeps everything).

Each sample is a dict with ``conversations`` (LLaVA messages) and optionally ``video``, the EK100 fields
(``verb_id``/``noun_id``/``action_id``, ``start``/``end`` or ``start_timestamp``/``end_timestamp``,
``narration_id``), ``uid`` and anything else, kept as is. The loader adds ``"_source": "file:line"`` (JSONL) or
``"file[index]"`` (JSON) so later errors can name where a sample came from.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import numpy as np
import yaml

SOURCE_KEY = "_source"  # where a sample was read from, added by this loader
STRATEGIES = ("all", "first", "end", "random")
_INT_FIELDS = ("verb_id", "noun_id", "action_id")
_TIME_FIELDS = ("start", "end", "start_timestamp", "end_timestamp")


class MixtureError(ValueError):
    """A bad mixture YAML, sample file or sample; the message names the file and the line / record."""


def load_mixture(data_path: str | os.PathLike, seed: int = 0) -> list[dict]:
    """All samples of ``data_path`` (a YAML mixture, a ``{a,b}.json`` brace list, or one JSON / JSONL file)."""
    text = str(data_path)
    if text.endswith((".yaml", ".yml")):
        return _load_yaml(pathlib.Path(text), seed)
    match = re.fullmatch(r"(.*)\{(.*)\}(\.jsonl?)", text)
    if match:
        base, names, suffix = match.groups()
        return [s for name in names.split(",") for s in read_samples_file(f"{base}{name.strip()}{suffix}")]
    return read_samples_file(text)


def read_samples_file(path: str | os.PathLike) -> list[dict]:
    """The samples of one ``.json`` (a list) or ``.jsonl`` (one object per line, blank lines skipped) file."""
    path = pathlib.Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise MixtureError(f"{path}: unsupported sample file type {path.suffix!r}; expected .json or .jsonl")
    if not path.is_file():
        raise MixtureError(f"sample file {path} does not exist")
    samples = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise MixtureError(f"{where}: not valid JSON ({error})") from None
                samples.append(check_sample(item, where))
    else:
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise MixtureError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(items, list):
            raise MixtureError(f"{path}: expected a JSON list of samples, got {type(items).__name__}")
        samples = [check_sample(item, f"{path}[{i}]") for i, item in enumerate(items)]
    return samples


def check_sample(item, where: str) -> dict:
    """Structural checks of one sample (``where`` names it in errors); returns a copy with ``_source`` set.

    Placeholder counts are checked later, per sample, by the pipeline (whose ``skip`` policy can drop them).
    """
    if not isinstance(item, dict):
        raise MixtureError(f"{where}: a sample must be a JSON object, got {type(item).__name__}")
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise MixtureError(f"{where}: 'conversations' must be a non-empty list of messages")
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not ({"from", "value"} <= message.keys()
                                                 or {"role", "content"} <= message.keys()):
            raise MixtureError(f"{where}: conversations[{i}] must be an object with from/value (or role/content)")
    if "video" in item and item["video"] is not None and not isinstance(item["video"], str):
        raise MixtureError(f"{where}: 'video' must be a string, got {type(item['video']).__name__}")
    for key in _INT_FIELDS:
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MixtureError(f"{where}: {key!r} must be an integer, got {value!r}")
    for key in _TIME_FIELDS:
        value = item.get(key)
        if value is not None:
            try:
                float(value)  # temporal-detection files store times as strings (generate_temporal_detection_data.py)
            except (TypeError, ValueError):
                raise MixtureError(f"{where}: {key!r} must be a number of seconds, got {value!r}") from None
    return {**item, SOURCE_KEY: where}


def parse_sampling_strategy(strategy: str) -> tuple[str, int | None, float | None]:
    """``"first:100"`` -> ("first", 100, None); ``"random:5%"`` -> ("random", None, 5.0); ``"all"`` -> ("all", None, None)."""
    text = str(strategy).strip()
    name, _, amount = text.partition(":")
    if name not in STRATEGIES or (name == "all") != (amount == ""):
        raise ValueError(f"sampling_strategy {strategy!r}: expected all, first:N, end:N, random:N or "
                         "first:P%, end:P%, random:P%")
    if name == "all":
        return name, None, None
    try:
        if amount.endswith("%"):
            percent = float(amount[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return name, None, percent
        count = int(amount)
        if count < 0:
            raise ValueError
        return name, count, None
    except ValueError:
        raise ValueError(f"sampling_strategy {strategy!r}: {amount!r} is not a count >= 0 or a percentage in "
                         "0..100") from None


def apply_sampling_strategy(samples: list, strategy: str, seed: int = 0) -> list:
    """Upstream's selection: ``first`` = head, ``end`` = tail, ``random`` = seeded shuffle then head."""
    name, count, percent = parse_sampling_strategy(strategy)
    if name == "all":
        return list(samples)
    if percent is not None:
        count = math.ceil(percent * len(samples) / 100)
    count = min(count, len(samples))
    if name == "first":
        return list(samples[:count])
    if name == "end":
        return list(samples[len(samples) - count:])
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order[:count]]


def _load_yaml(path: pathlib.Path, seed: int) -> list[dict]:
    if not path.is_file():
        raise MixtureError(f"mixture file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise MixtureError(f"{path}: not valid YAML ({error})") from None
    datasets = config.get("datasets") if isinstance(config, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise MixtureError(f"{path}: expected a top-level 'datasets:' list of {{json_path, sampling_strategy}}")
    samples = []
    for i, entry in enumerate(datasets):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise MixtureError(f"{where}: expected a mapping with a 'json_path' string")
        json_path = pathlib.Path(entry["json_path"])
        if not json_path.is_absolute():
            json_path = path.parent / json_path
        try:
            # The entry index joins the seed so two entries sampling the same file draw independently.
            chosen = apply_sampling_strategy(read_samples_file(json_path), entry.get("sampling_strategy", "all"),
                                             seed=np.random.SeedSequence([seed, i]).generate_state(1)[0])
        except ValueError as error:
            raise MixtureError(f"{where}: {error}") from None
        samples.extend(chosen)
    return samples
