"""Training checkpoints: Orbax CheckpointManager with the train state, the data-iterator state and metadata.

One step directory holds `state/` (params, optimizer state, step; restored straight into the mesh's shardings),
`data/` (Grain iterator state, one file per process) and `meta/` (JSON: config, seed, step). Saves are async and
atomic (Orbax writes a temporary directory and renames it when complete); the last N are kept. Restore walks
the steps newest first and skips, with a warning, any directory that is incomplete or fails to read, so a run
killed mid-save resumes from the last good checkpoint.
"""

from __future__ import annotations

import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
REQUIRED_ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
    pass


def make_manager(directory: str | pathlib.Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: dict, data_iterator=None):
    """(step, state, meta) of the newest checkpoint that restores cleanly, or None if there is none.

    The data iterator, if given, is restored in place.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = pathlib.Path(manager.directory) / str(step)
        problem = looks_complete(step_dir)
        if problem is None:
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None and (step_dir / "data").is_dir():
                items["data"] = grain.checkpoint.CheckpointRestore(item=data_iterator)
            try:
                restored = manager.restore(step, args=ocp.args.Composite(**items))
                return step, restored["state"], restored["meta"]
            except Exception as e:  # a partial or corrupt directory must never stop a resume
                problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log.warning("skipping checkpoint %s: %s", step_dir, problem)
        if jax.process_index() == 0:
            print(f"warning: skipping checkpoint {step_dir}: {problem}", flush=True)
    return None
