"""Training checkpoints: Orbax CheckpointManager with the train state, the data-iterator state and metadata.

One step directory holds `state/` (params, optimizer state, step; restored straight into the mesh's shardings),
`data/` (Grain iterator state, one file per process), `meta/` (JSON: config, step, loss, and `state_check`: whether
the state was finite and a digest of every array, computed on the devices at save time, train/state_check.py)
and `checksums.json` (sha256 of every file; llavaction_jax/integrity.py). Saves are async and atomic (Orbax writes
a temporary directory and renames it when complete); a background thread seals each checkpoint (writes its
checksums) as soon as its save is complete, and the run's clean exit waits for the last one.

Restore walks the steps newest first. A step is used only once it holds up: Orbax's files are all there; its
checksums match (a sealed step) or, for a step that lost its seal (killed between the save and the seal), every
array is read back and matches the digest saved with it; its saved state was finite; it restores. A step that
fails is reported by path and moved aside into `<dir>.broken/` (renamed, never deleted, with a `.reason.txt`), so
the next save of that step number works, and the previous step is tried. When every step fails, the run is
refused (naming what was moved aside) unless `restart_if_all_broken`. Rotation keeps the newest `keep`
checkpoints of this run only: steps this run did not write or restore from are never deleted.

A save that fails (a full disk, a lost mount) raises `CheckpointSaveError` with the save's own error, the path
and the free space, once: at the save for a synchronous save, at the next step for an async one. The failed
step's partial files are removed; every earlier checkpoint is kept.
"""

from __future__ import annotations

import errno
import logging
import math
import pathlib
import re
import shutil
import threading
import time

import grain
import jax
import orbax.checkpoint as ocp

from llavaction_jax import checkpoint_io, integrity
from llavaction_jax.locks import allgather_text
from llavaction_jax.pause_points import pause_point
from llavaction_jax.train import state_check

log = logging.getLogger(__name__)
REQUIRED_ITEMS = ("state", "meta")
RESTART_FLAG = "--config.train.restart_if_all_broken=true"


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (or sealed); earlier checkpoints are intact."""


def _say(message: str) -> None:
    log.warning(message)
    if jax.process_index() == 0:
        print(f"warning: {message}", flush=True)


# tensorstore's OS errors: ... Failed writing: "PATH": Failed to write N bytes to file 17: No space left on device
# [os_error_code='28']
_TENSORSTORE_OS_ERROR = re.compile(r'"([^"]+)": [^"]*?: ([^:\[\]"]+?) \[os_error_code=\'(\d+)\'\]')


def _first_line(error: BaseException) -> str:
    """The error in one line: an OS error as `[Errno 28] No space left on device (ENOSPC): 'PATH'`, wherever it
    came from (Python's own, or tensorstore's inside Orbax's message), else the first line of the message."""
    if isinstance(error, OSError) and error.errno:
        return f"[Errno {error.errno}] {error.strerror} ({errno.errorcode.get(error.errno, '?')}): '{error.filename}'"
    text = str(error)
    found = _TENSORSTORE_OS_ERROR.search(text)
    if found:
        path, reason, code = found.group(1), found.group(2).strip(), int(found.group(3))
        return f"[Errno {code}] {reason} ({errno.errorcode.get(code, '?')}): '{path}'"
    lines = text.strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400] if lines else ''}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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


def verified_problem(step_dir: pathlib.Path) -> tuple[str | None, bool]:
    """(problem or None, sealed): whether the step directory is complete and matches its checksums; a step without
    checksums (not sealed) is not a problem here, its arrays are checked when they are read."""
    problem = looks_complete(step_dir)
    sealed = False
    if problem is None:
        try:
            sealed = integrity.verify_manifest(step_dir, required=False)
        except integrity.IntegrityError as e:
            problem = str(e)
    return problem, sealed


class Checkpoints:
    """The run's checkpoint directory: save (sealed with checksums once complete), restore with verification and
    fallback, rotation of our own steps."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = pathlib.Path(directory).absolute()
        self.manager = make_manager(self.directory, async_save)
        self.async_save = async_save
        self.keep = keep
        self.ours: set[int] = set()  # steps this run wrote, restored from, or that precede it with the same config
        self._sealer: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self._failed_steps: set[int] = set()  # their partial files are removed again once Orbax's threads end

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, step: int, state: dict, meta: dict, data_iterator=None) -> None:
        """Write checkpoint `step` (async unless configured otherwise); it is sealed as soon as it is complete."""
        self.wait()
        meta = dict(meta, state_check=state_check.summarize(state))
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # the save's own error, named with its step and the free space
            raise self._save_failed(step, error) from None
        if self.async_save:
            self._sealer = threading.Thread(target=self._seal_when_saved, args=(step,), name=f"seal-{step}",
                                            daemon=True)
            self._sealer.start()
        else:
            self._seal_when_saved(step)
            self._raise_failure()

    def _seal_when_saved(self, step: int) -> None:
        """Wait for the save of `step`, then write its checksums (process 0); a failure is kept for the loop."""
        try:
            self.manager.wait_until_finished()
            pause_point("checkpoint-saved", step)
            if jax.process_index() == 0:
                integrity.write_manifest(self.step_dir(step))
            self.ours.add(step)
            pause_point("checkpoint-sealed", step)
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread
            self._failure = (step, error)

    def check(self) -> None:
        """Raise CheckpointSaveError if an async save (or its seal) has failed; cheap, called after every step.
        With several processes the failure is agreed on at the next save or exit (`wait`) instead."""
        if jax.process_count() == 1 and self._sealer is not None and not self._sealer.is_alive():
            self._sealer.join()
            self._sealer = None
            self._raise_failure()

    def wait(self) -> None:
        """Wait until the last save is complete and sealed (raising its error, on every process), then rotate."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        if jax.process_count() > 1:
            failed = [text for text in allgather_text(self._failure_text()) if text]  # any process's failure
            if failed and self._failure is None:
                raise CheckpointSaveError(f"another process: {failed[0]}")
        self._raise_failure()
        self.rotate()

    def close(self, raise_errors: bool = True) -> None:
        """At the end of the run: wait for and seal the last save. `raise_errors=False` while another error is
        already on its way out (it is the one reported; a save failure is then only logged)."""
        try:
            self.wait()
        except Exception as error:
            if raise_errors:
                raise
            log.error("checkpoint save failed during shutdown: %s", error)
        finally:
            self._close_manager()

    def _close_manager(self) -> None:
        """Join Orbax's background threads (a failed save's writers among them), then remove what a failed save
        left (its writers may still have been creating files when the failure was first reported)."""
        try:
            self.manager.close()
        except Exception as error:  # noqa: BLE001 - a failed save's error again; already reported
            log.debug("closing the checkpoint manager: %s", error)
        if jax.process_index() == 0:
            for step in self._failed_steps:
                for leftover in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(leftover, ignore_errors=True)

    def seal(self) -> None:
        self.wait()

    def _failure_text(self) -> str:
        return str(self._describe_failure()) if self._failure is not None else ""

    def _describe_failure(self) -> CheckpointSaveError:
        step, error = self._failure
        return self._save_failed(step, error)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            described = self._describe_failure()
            self._failure = None
            raise described

    def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        """The save's own error, where, and the free space; the failed step's partial files are removed."""
        if isinstance(error, CheckpointSaveError):
            return error
        self._failed_steps.add(step)
        if jax.process_index() == 0:
            try:  # the save's other writers (its other items, tensorstore's threads) finish before its files go
                self.manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - the same failure again; `error` is the one reported
                pass
            for leftover in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
            (self.step_dir(step) / f"{integrity.MANIFEST}.tmp").unlink(missing_ok=True)
        try:
            free = _bytes(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "unknown"
        try:
            kept = sorted(self.manager.all_steps())
        except Exception:  # noqa: BLE001 - listing is best effort here
            kept = []
        kept = [k for k in kept if k != step or integrity.has_manifest(self.step_dir(k))]
        resume = (f"free space and rerun the same command to resume from step {kept[-1]}" if kept else
                  "free space and rerun the same command")
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.step_dir(step)} failed: {_first_line(error)} ({free} free on that "
            f"filesystem). Stopped; the earlier checkpoints are kept ({', '.join(map(str, kept)) or 'none'}); "
            f"{resume}")

    def rotate(self) -> None:
        ours = sorted(s for s in self.ours if s in self.manager.all_steps())
        for step in ours[: max(0, len(ours) - self.keep)]:
            self.manager.delete(step)
            self.ours.discard(step)

    # ----------------------------------------------------------------------------------------------- restoring
    def move_aside(self, step: int, problem: str) -> pathlib.Path:
        """Rename a broken step directory into `<dir>.broken/` so its step number can be written again."""
        broken, stamp = self.directory.with_name(self.directory.name + ".broken"), time.strftime("%Y%m%dT%H%M%S")
        target, n = broken / f"{step}-{stamp}", 1
        while target.exists():  # the same step moved aside again within the second
            target, n = broken / f"{step}-{stamp}-{n}", n + 1
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            self.step_dir(step).rename(target)
            (target.parent / f"{target.name}.reason.txt").write_text(problem + "\n")
        checkpoint_io.sync_processes(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def restore_latest(self, abstract_state: dict, data_iterator=None, check_meta=None, allow_missing_data=False,
                       same_run=None, restart_if_all_broken=False):
        """(step, state, meta) of the newest checkpoint that holds up (module docstring), or None if there is none.

        `check_meta(meta) -> bool` sees each candidate's metadata before its arrays are read: it raises to refuse
        the run (a changed config), or returns whether to restore the data iterator (in place) from it. A step
        without iterator state raises CheckpointError unless `allow_missing_data`. Older steps for which
        `same_run(their meta)` holds join this run's rotation; the others are kept. When there were checkpoints
        and every one was broken, CheckpointError names what was moved aside, unless `restart_if_all_broken`.
        """
        moved = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.step_dir(step)
            problem, sealed = verified_problem(step_dir)
            if problem is None:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # a corrupt directory must never stop a resume
                    problem = _first_line(e)
            if problem is None:
                restore_data = check_meta(meta) if check_meta is not None else True
                if data_iterator is not None and restore_data and not (step_dir / "data").is_dir():
                    if not allow_missing_data:
                        raise CheckpointError(
                            f"checkpoint {step_dir} has no data-iterator state, so the data order cannot continue; "
                            "resume anyway, restarting the data order, with --config.train.allow_changed_data=true")
                    restore_data = False
                if (meta.get("state_check") or {}).get("finite") is False:
                    problem = "its state was not finite (NaN or Inf) when it was saved"
            if problem is None:
                items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
                if data_iterator is not None and restore_data:
                    items["data"] = grain.checkpoint.CheckpointRestore(item=data_iterator)
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                    problem = state_check.problem(meta.get("state_check"), restored["state"])
                except Exception as e:
                    problem = _first_line(e)
            if problem is None:
                if not sealed:
                    how = ("matches the digest saved with it" if (meta.get("state_check") or {}).get("digest")
                           else "is finite (it predates saved digests)")
                    _say(f"checkpoint {step_dir} has no {integrity.MANIFEST} (the run stopped after its save, "
                         f"before it was sealed): every array was read back and {how}; resuming from it")
                if same_run is not None:  # older steps of the same run join the rotation; others are kept
                    self.ours.update(s for s in self.manager.all_steps() if s <= step
                                     and self._meta_holds(s, same_run))
                return step, restored["state"], restored["meta"]
            target = self.move_aside(step, problem)
            moved.append(target)
            _say(f"skipping checkpoint {step_dir}: {problem}; moved to {target}")
        if moved and not restart_if_all_broken:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is broken; moved aside: {', '.join(map(str, moved))} (the "
                f"reason of each is in its .reason.txt). Move one back after checking it, or start over from step 0 "
                f"with {RESTART_FLAG}")
        return None

    def _meta_holds(self, step: int, predicate) -> bool:
        try:
            return bool(predicate(self.read_meta(step)))
        except Exception:
            return False

    def newest_good(self) -> int | None:
        """The newest step that is sealed, verifies, and whose state was finite when it was saved (checkpoints older
        than that record: whose loss was finite). The NaN stop names it."""
        self.close(raise_errors=False)
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem, sealed = verified_problem(self.step_dir(step))
            if problem is not None or not sealed:
                continue
            try:
                meta = self.read_meta(step)
            except Exception:
                continue
            checked = meta.get("state_check")
            if checked is not None:
                if checked.get("finite"):
                    return step
                continue
            loss = meta.get("loss", 0.0)
            if loss is not None and math.isfinite(loss):
                return step
        return None
