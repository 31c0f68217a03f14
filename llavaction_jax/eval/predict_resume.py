"""`predict --batch FILE --out OUT`: answers written as they come, failed clips recorded, and a rerun that resumes.

OUT gets one JSON record per line of the batch file, with ``line`` (its line number there) and, for a clip that
could not be read, ``error`` instead of an answer. While a run is unfinished or has failures, a state file
``.OUT.predict-state.json`` beside OUT holds the fingerprint of what the answers depend on (the model's content,
the tokenizer, the frames, decoding settings). A rerun with the same fingerprint keeps the answered records,
retries the failed and missing lines, and rewrites OUT in the batch file's order; once every line is answered the
state file is removed. OUT without a state file is a finished run's (or not ours) and is never overwritten; a
state file with another fingerprint is refused (the kept answers would mix two models or settings).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from llavaction_jax import integrity

SCHEMA = "llavaction_jax.predict_state/1"


def state_path(out: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out).absolute()
    return out.parent / f".{out.name}.predict-state.json"


def fingerprint(model_dir: str, tokenizer_dir: str | None, settings: dict) -> str:
    what = {"model": integrity.content_digest(model_dir),
            "tokenizer": integrity.content_digest(tokenizer_dir) if tokenizer_dir else None, "settings": settings}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def item_key(item) -> dict:
    """What a record must match to stand for a line of the batch file (the file may have been edited since)."""
    return {"video": item.video, "start": item.start, "end": item.end, "question": item.question,
            "options": list(item.options) or None}


def _record_key(record: dict) -> dict:
    return {"video": record.get("video"), "start": record.get("start"), "end": record.get("end"),
            "question": record.get("question"), "options": record.get("options")}


class PredictOutput:
    """OUT and its state file; `open` decides what a rerun keeps, `add` appends, `finish` writes the final file."""

    def __init__(self, out: str | os.PathLike, fingerprint_: str):
        self.out = pathlib.Path(out)
        self.state = state_path(out)
        self.fingerprint = fingerprint_
        self.records: dict[int, dict] = {}  # line -> record (answered and failed)
        self._sink = None

    def open(self, items_by_line: dict[int, object], log) -> set[int]:
        """Lines already answered by an earlier run of the same fingerprint (they are skipped)."""
        kept: dict[int, dict] = {}
        if self.out.exists() and self.out.stat().st_size:
            if not self.state.is_file():
                raise FileExistsError(f"{self.out} exists and is not empty (a finished run's output, or not "
                                      "predict's); refusing to overwrite it")
            try:
                saved = json.loads(self.state.read_text()).get("fingerprint")
            except ValueError:
                saved = None
            if saved != self.fingerprint:
                raise FileExistsError(f"{self.out} holds answers of a predict run with another model or settings "
                                      f"({self.state} differs); write to another --out, or delete both to start over")
            for line in self.out.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a killed run
                number = record.get("line") if isinstance(record, dict) else None
                if (number in items_by_line and "error" not in record
                        and _record_key(record) == item_key(items_by_line[number])):
                    kept[number] = record
            retried = sum(1 for n in items_by_line if n not in kept)
            log(f"[predict] resuming {self.out}: {len(kept)} clip(s) already answered, {retried} to answer or retry")
        self.records = dict(kept)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps({"schema": SCHEMA, "fingerprint": self.fingerprint}) + "\n")
        self._rewrite()
        self._sink = open(self.out, "a", encoding="utf-8")
        return set(kept)

    def add(self, record: dict) -> None:
        self.records[record["line"]] = record
        self._sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._sink.flush()

    def finish(self) -> int:
        """Rewrite OUT in line order; remove the state file when nothing failed. Returns the number failed."""
        self.close()
        self._rewrite()
        failed = sum("error" in r for r in self.records.values())
        if not failed:
            self.state.unlink(missing_ok=True)
        return failed

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _rewrite(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("".join(json.dumps(self.records[n], ensure_ascii=False) + "\n" for n in sorted(self.records)),
                       encoding="utf-8")
        os.replace(tmp, self.out)
