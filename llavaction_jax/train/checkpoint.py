"""Training checkpoints: Orbax CheckpointManager with the train state, the data-iterator state and metadata.

One step directory holds `state/` (params, optimizer state, step; restored straight into the mesh's shardings),
`data/` (Grain iterator state, one file per process), `meta/` (JSON: config, step, loss) and `checksums.json`
(sha256 of every file, written once the save is complete; llavaction_jax/integrity.py). Saves are async and
atomic (Orbax writes a temporary directory and renames it when complete).

Restore walks the steps newest first. A step that is incomplete, fails its checksums or fails to read is reported
by path and moved aside into `<dir>.broken/` (renamed, never deleted), so the next save of that step number
works, and the previous step is tried. Rotation keeps the newest `keep` checkpoints of this run only: steps
this run did not write or restore from are never deleted.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time

import grain
import jax
import orbax.checkpoint as ocp

from llavaction_jax import checkpoint_io, integrity

log = logging.getLogger(__name__)
REQUIRED_ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
    pass


def _say(message: str) -> None:
    log.warning(message)
    if jax.process_index() == 0:
        print(f"warning: {message}", flush=True)


def make_manager(directory: str | pathlib.Path, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager that never deletes on its own (rotation is `Checkpoints.rotate`, which knows what is ours)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def looks_complete(step_dir: pathlib.Path) -> str | None:
    """None if the step directory has every file a finished save leaves, else what is missing."""
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        return "_CHECKPOINT_METADATA is missing"
    for item in REQUIRED_ITEMS:
        if not (step_dir / item).is_dir():
            return f"item {item!r} is missing"
    if not (step_dir / "state" / "_METADATA").is_file():
        return "state/_METADATA is missing"
    return None


def verified_problem(step_dir: pathlib.Path) -> str | None:
    """None if the step directory is complete and matches its checksums (or predates them), else the problem."""
    problem = looks_complete(step_dir)
    if problem is None:
        try:
            if not integrity.verify_manifest(step_dir, required=False):
                _say(f"checkpoint {step_dir} has no {integrity.MANIFEST} (interrupted before it was written, or "
                     "older than checksums): loading it unverified")
        except integrity.IntegrityError as e:
            problem = str(e)
    return problem


class Checkpoints:
    """The run's checkpoint directory: save (with checksums), restore with fallback, rotation of our own steps."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = pathlib.Path(directory).absolute()
        self.manager = make_manager(self.directory, async_save)
        self.async_save = async_save
        self.keep = keep
        self.ours: set[int] = set()  # steps this run wrote, restored from, or that precede it with the same config
        self._unsealed: list[int] = []

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def save(self, step: int, state: dict, meta: dict, data_iterator=None) -> None:
        self.seal()
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unsealed.append(step)
        self.ours.add(step)
        if not self.async_save:
            self.seal()

    def seal(self) -> None:
        """Wait for pending saves, write their checksums, then rotate."""
        self.manager.wait_until_finished()
        if self._unsealed and jax.process_index() == 0:
            for step in self._unsealed:
                integrity.write_manifest(self.step_dir(step))
        self._unsealed = []
        self.rotate()

    def rotate(self) -> None:
        ours = sorted(s for s in self.ours if s in self.manager.all_steps())
        for step in ours[: max(0, len(ours) - self.keep)]:
            self.manager.delete(step)
            self.ours.discard(step)

    def move_aside(self, step: int, problem: str) -> pathlib.Path:
        """Rename a broken step directory into `<dir>.broken/` so its step number can be written again."""
        target = self.directory.with_name(self.directory.name + ".broken") / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            self.step_dir(step).rename(target)
            (target.parent / f"{target.name}.reason.txt").write_text(problem + "\n")
        checkpoint_io.sync_processes(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def restore_latest(self, abstract_state: dict, data_iterator=None, check_meta=None, allow_missing_data=False,
                       same_run=None):
        """(step, state, meta) of the newest checkpoint that verifies and restores, or None if there is none.

        `check_meta(meta) -> bool` sees each candidate's metadata before its arrays are read: it raises to refuse
        the run (a changed config), or returns whether to restore the data iterator (in place) from it. A step
        without iterator state raises CheckpointError unless `allow_missing_data`. Older steps for which
        `same_run(their meta)` holds join this run's rotation; the others are kept.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.step_dir(step)
            problem = verified_problem(step_dir)
            if problem is None:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # a corrupt directory must never stop a resume
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if problem is None:
                restore_data = check_meta(meta) if check_meta is not None else True
                if data_iterator is not None and restore_data and not (step_dir / "data").is_dir():
                    if not allow_missing_data:
                        raise CheckpointError(
                            f"checkpoint {step_dir} has no data-iterator state, so the data order cannot continue; "
                            "resume anyway, restarting the data order, with --config.train.allow_changed_data=true")
                    restore_data = False
                items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
                if data_iterator is not None and restore_data:
                    items["data"] = grain.checkpoint.CheckpointRestore(item=data_iterator)
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                    if same_run is not None:  # older steps of the same run join the rotation; others are kept
                        self.ours.update(s for s in self.manager.all_steps() if s <= step
                                         and self._meta_holds(s, same_run))
                    return step, restored["state"], restored["meta"]
                except Exception as e:
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            moved = self.move_aside(step, problem)
            _say(f"skipping checkpoint {step_dir}: {problem}; moved to {moved}")
        return None

    def _meta_holds(self, step: int, predicate) -> bool:
        try:
            return bool(predicate(self.read_meta(step)))
        except Exception:
            return False

    def newest_good(self) -> int | None:
        """The newest step that verifies and whose recorded loss was finite (the NaN stop names it)."""
        self.seal()
        for step in sorted(self.manager.all_steps(), reverse=True):
            if verified_problem(self.step_dir(step)) is None:
                try:
                    loss = self.read_meta(step).get("loss", 0.0)
                except Exception:
                    continue
                if loss is not None and math.isfinite(loss):
                    return step
        return None
