"""Training runs that must not lose work: changed configs refused, corrupt checkpoints moved aside (all of them
broken: refused), the final model always the final step's and swapped in whole, bad recipe values refused, one
run per output directory, checkpoints sealed as soon as they are saved and verified by their digests when not, a
full disk reported as such. Real Orbax checkpoints of the tiny model; interruption tests stop a real `train`
process at a named point (tests/_pause.py) and signal it there. None of these claims is about sharding, so the
module trains on one device (the sharded train step and its resume: test_train_step.py, test_train_loop.py)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from _cli_e2e import run_cli_child
from _pause import kill, kill_when_stopped, pause_env, resume, wait_until_stopped
from _processes import run_logged
from _train_fixtures import (assert_same_tree, corrupt_record, make_training_data, subprocess_env, tiny_train_config,
                             train_command)
from llavaction_jax import checkpoint_io, integrity, locks
from llavaction_jax.config import ConfigError
from llavaction_jax.recipes import model_config
from llavaction_jax.train import guard
from llavaction_jax.train.checkpoint import RESTART_FLAG, CheckpointError, Checkpoints, CheckpointSaveError
from llavaction_jax.train.loop import FINAL_STEP_FILE, train

# Training, signals and child processes: the module runs in a child process with one CPU device, each test with a
# deadline (tests/_watchdog.py). Its `train` child processes get one device too (DEVICES).
DEVICES = 1
pytestmark = pytest.mark.watchdog(1200, devices=DEVICES)

REPO = pathlib.Path(__file__).resolve().parents[1]
# fsdp=-1: every device of the process (one here, the suite's 8 where the watchdog is off); the same mesh in every
# run of the module, so its programs compile once (the run's compilation cache, conftest.py). A measured peak is not
# needed for these claims (the MFU column only): a given one spares each run the matmul it would time.
MESH = {"mesh.fsdp": -1, "mesh.tensor": 1}
BASE = {"train.checkpoint_every": 1, "train.peak_flops": 1e11, **MESH}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("recovery_data"))


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """3 steps, a checkpoint after each, final model at step 3."""
    out = tmp_path_factory.mktemp("base_run")
    assert train(tiny_train_config(data, out, steps=3, **BASE))["step"] == 3
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def flip_bits(file: pathlib.Path, n: int = 20) -> None:
    raw = bytearray(file.read_bytes())
    for i in np.random.default_rng(0).choice(len(raw), n, replace=False):
        raw[i] ^= 0x10
    file.write_bytes(bytes(raw))


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def tree_listing(directory: pathlib.Path) -> dict:
    return {p.relative_to(directory).as_posix(): integrity.file_sha256(p) for p in directory.rglob("*") if p.is_file()}


def checkpoint_params(out: pathlib.Path, step: int):
    mngr = ocp.CheckpointManager(out / "checkpoints")
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


def model_params(model_dir: pathlib.Path, like):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return checkpoint_io.restore_params(model_dir, abstract)


def run_cli(cfg, **overrides):
    args = train_command(cfg) + [f"--config.{k}={v}" for k, v in overrides.items()]
    # no timeout of its own: the watchdog bounds the test
    return subprocess.run(args, cwd=REPO, env=subprocess_env(DEVICES), capture_output=True, text=True)


def test_base_run_writes_checksums_and_the_final_step(base_run):
    for step in (1, 2, 3):
        assert integrity.verify_manifest(base_run / "checkpoints" / str(step))
    assert integrity.verify_manifest(base_run / "model")
    assert json.loads((base_run / "model" / FINAL_STEP_FILE).read_text()) == {"step": 3}


def test_changed_state_is_refused_by_the_cli_and_nothing_is_touched(data, run_copy):
    before = tree_listing(run_copy / "checkpoints")
    proc = run_cli(tiny_train_config(data, run_copy, steps=6, **BASE), **{"train.seed": 1, "optim.weight_decay": 0.1})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("train: error:"), proc.stderr
    assert "optim.weight_decay 0.0 -> 0.1" in error[0] and "train.seed 0 -> 1" in error[0]
    assert tree_listing(run_copy / "checkpoints") == before


def test_changed_model_config_is_refused_in_process(data, run_copy):
    cfg = tiny_train_config(data, run_copy, steps=3, **BASE)
    cfg.model.param_dtype = "bfloat16"
    with pytest.raises(guard.RunMismatch, match=r'model.param_dtype "float32" -> "bfloat16"'):
        train(cfg)


def test_changed_data_needs_the_flag_keeps_the_old_run_and_skips_corrupt_shard_records(data, run_copy, tmp_path):
    """Continue with a smaller batch over a copy of the shards with damaged records (data.on_bad_sample=skip)."""
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    for uid in ("c1", "c6", "c11", "c14"):
        corrupt_record(shards / "clips.array_record", uid)
    before = tree_listing(run_copy / "checkpoints")
    changed = {**BASE, "train.batch_size": 4, "train.keep_checkpoints": 1, "data.shards": shards,
               "data.on_bad_sample": "skip"}
    with pytest.raises(guard.RunMismatch, match=r"data.shards .* -> .*; train.batch_size 8 -> 4.*allow_changed_data=true"):
        train(tiny_train_config(data, run_copy, steps=5, **changed))
    assert tree_listing(run_copy / "checkpoints") == before
    summary = train(tiny_train_config(data, run_copy, steps=5, **changed, **{"train.allow_changed_data": True}))
    assert summary["step"] == 5 and len(summary["losses"]) == 2
    assert summary["skipped_samples"] >= 1
    assert json.loads((run_copy / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]
    steps = sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit())
    # keep=1 rotates this run's own steps (4 goes when 5 is written); the old run's 1-3 are never deleted
    assert steps == [1, 2, 3, 5]
    for step in (1, 2, 3):
        rel = f"{step}/"
        assert {k: v for k, v in tree_listing(run_copy / "checkpoints").items() if k.startswith(rel)} == \
               {k: v for k, v in before.items() if k.startswith(rel)}


def test_corrupt_newest_checkpoint_is_moved_aside_and_an_extended_run_exports_its_last_step(data, run_copy, capsys):
    corrupt = largest_file(run_copy / "checkpoints" / "3" / "state")
    flip_bits(corrupt)
    # 5 steps, as the full-disk test's run: the same program (the schedule's length is compiled into it); 4 kept
    summary = train(tiny_train_config(data, run_copy, steps=5, **BASE, **{"train.keep_checkpoints": 4}))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {run_copy / 'checkpoints' / '3'}: {corrupt} is corrupt" in out
    assert "resumed from step 2" in out
    assert summary["stopped"] == "completed" and summary["step"] == 5 and len(summary["losses"]) == 3
    # the broken step was renamed, not deleted, and step 3 was written again (no StepAlreadyExistsError)
    (moved,) = (run_copy / "checkpoints.broken").glob("3-*/state")
    assert (moved.parent / "state" / corrupt.relative_to(run_copy / "checkpoints" / "3" / "state")).is_file()
    for step in (2, 3, 4, 5):
        assert integrity.verify_manifest(run_copy / "checkpoints" / str(step))
    # the final model is step 5's, swapped in whole
    assert json.loads((run_copy / "model" / FINAL_STEP_FILE).read_text()) == {"step": 5}
    params = checkpoint_params(run_copy, 5)
    assert_same_tree(model_params(run_copy / "model", params), params)
    assert not (run_copy / "model.partial").exists() and not (run_copy / "model.previous").exists()


def test_nan_stop_names_the_newest_verified_checkpoint(run_copy):
    assert Checkpoints(run_copy / "checkpoints").newest_good() == 3
    flip_bits(largest_file(run_copy / "checkpoints" / "3" / "state"))
    assert Checkpoints(run_copy / "checkpoints").newest_good() == 2


def test_model_with_flipped_bits_fails_loading_naming_the_file(base_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base_run / "model", model)
    params = checkpoint_params(base_run, 3)
    assert_same_tree(model_params(model, params), params)
    corrupt = largest_file(model / "params")
    flip_bits(corrupt)
    with pytest.raises(integrity.IntegrityError) as err:
        model_params(model, params)
    assert str(err.value) == f"{corrupt} is corrupt: its sha256 differs from the one written when it was saved"


def test_checkpoint_without_data_state_needs_the_flag(data, run_copy):
    step3 = run_copy / "checkpoints" / "3"
    shutil.rmtree(step3 / "data")
    integrity.write_manifest(step3)  # a consistent checkpoint that simply has no iterator state
    with pytest.raises(CheckpointError, match=r"has no data-iterator state.*allow_changed_data=true"):
        train(tiny_train_config(data, run_copy, steps=3, **BASE))
    summary = train(tiny_train_config(data, run_copy, steps=3, **BASE, **{"train.allow_changed_data": True}))
    assert summary["step"] == 3 and summary["stopped"] == "completed"


def test_sigkill_during_the_final_model_save_then_a_rerun_replaces_the_leftover(data, run_copy, tmp_path):
    shutil.rmtree(run_copy / "model")  # the rerun restores step 3 and goes straight to the final save
    cfg = tiny_train_config(data, run_copy, steps=3, **BASE)
    log = tmp_path / "train.log"
    # stopped inside the save (params written, config and checksums not), then killed there
    proc = run_logged(train_command(cfg), log, cwd=REPO, env=pause_env(subprocess_env(DEVICES), "model-params-written"))
    kill_when_stopped(proc, log)
    partial = run_copy / "model.partial"
    assert (partial / "params").is_dir() and not (run_copy / "model").exists() and not integrity.has_manifest(partial)
    assert train(cfg)["step"] == 3
    assert not partial.exists() and integrity.verify_manifest(run_copy / "model")
    params = checkpoint_params(run_copy, 3)
    assert_same_tree(model_params(run_copy / "model", params), params)


def test_a_partial_model_dir_from_an_older_save_is_replaced(data, run_copy):
    (run_copy / "model" / integrity.MANIFEST).unlink()
    truncated = largest_file(run_copy / "model" / "params")
    truncated.write_bytes(truncated.read_bytes()[:10])
    train(tiny_train_config(data, run_copy, steps=3, **BASE))
    params = checkpoint_params(run_copy, 3)
    assert_same_tree(model_params(run_copy / "model", params), params)


@pytest.mark.parametrize("override, message", [
    ({"train.steps": 0}, "train.steps=0: must be at least 1"),
    ({"train.batch_size": 0}, "train.batch_size=0: must be at least 1"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every=0: must be at least 1"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0: must be at least 1"),
    ({"optim.learning_rate": -1e-5}, "optim.learning_rate=-1e-05: must be a finite value >= 0"),
    ({"optim.learning_rate": 1e39}, "optim.learning_rate=1e+39: must be a finite value >= 0 (in float32"),
    ({"optim.warmup_ratio": 1.5}, "optim.warmup_ratio=1.5: must be in [0, 1]"),
    ({"data.on_bad_sample": "ignore"}, "data.on_bad_sample='ignore': must be 'error' or 'skip'"),
    ({"data.read_threads": -1}, "data.read_threads=-1: must be 0 (half the cores, 1 to 4) or more"),
])
def test_recipe_values_are_validated(data, tmp_path, override, message):
    steps = override.pop("train.steps", 3)
    with pytest.raises(ConfigError) as err:
        guard.validate(tiny_train_config(data, tmp_path, steps=steps, **override))
    assert str(err.value).startswith(message)


def test_cli_refusals_are_one_line_with_exit_code_2(data, tmp_path):
    """Both refusals through llavaction_jax.cli.main in one child process: exit status 2 each, and the only output
    of the two runs (stdout and stderr) is one error line each."""
    cfg = tiny_train_config(data, tmp_path, steps=3, **MESH)
    argv = train_command(cfg)[3:]  # ["train", --config.x=y ...]
    codes, output = run_cli_child([argv + ["--config.train.keep_checkpoints=0"],
                                   argv + [f"--config.data.samples={tmp_path / 'missing.jsonl'}"]], devices=DEVICES)
    assert codes == [2, 2], output
    lines = [line for line in output.strip().splitlines() if not line.startswith("EXIT CODES")]
    assert len(lines) == 2, output
    assert lines[0].startswith("train: error: train.keep_checkpoints=0") and not (tmp_path / "checkpoints").exists()
    assert lines[1] == f"train: error: sample file {tmp_path / 'missing.jsonl'} does not exist"


def abstract_of(checkpoints: pathlib.Path, step: int):
    state = ocp.CheckpointManager(checkpoints).restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), state


# ------------------------------------------------------------------------------ one run per output directory
def test_a_second_run_is_refused_while_the_first_holds_the_directory_and_sigterm_during_the_model_save_exits_0(
        data, run_copy):
    """A real `train` holds run_copy's lock (stopped right after taking it): an in-process run on the same directory
    is refused at once, naming it. Resumed, it goes straight to the final model's save (step 3 is done); SIGTERM
    arriving while the model's arrays are written lets the save complete and the run exit 0."""
    shutil.rmtree(run_copy / "model")
    cfg = tiny_train_config(data, run_copy, steps=3, **BASE)
    proc = subprocess.Popen(train_command(cfg), cwd=REPO, env=pause_env(subprocess_env(DEVICES),
                            "output-locked,model-params-written"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until_stopped(proc)
        before = tree_listing(run_copy / "checkpoints")
        with pytest.raises(locks.LockHeld) as held:
            train(cfg)
        assert "\n" not in str(held.value) and f"{run_copy} is in use by another run: train on host " in str(held.value)
        assert f"pid {proc.pid}, started " in str(held.value) and tree_listing(run_copy / "checkpoints") == before
        resume(proc)
        wait_until_stopped(proc)  # the final model's arrays are on disk, its config and checksums not yet
        resume(proc, signal.SIGTERM)
        out, _ = proc.communicate()  # no timeout of its own: the watchdog bounds the test
    finally:
        kill(proc)
    assert proc.returncode == 0, out
    assert "SIGTERM during the final model save: the save was completed first" in out
    assert integrity.verify_manifest(run_copy / "model")
    assert json.loads((run_copy / "model" / FINAL_STEP_FILE).read_text()) == {"step": 3}
    assert not locks.lock_path(run_copy).exists()


def test_the_lock_of_a_killed_run_is_stale_and_the_next_run_takes_over(data, run_copy, capsys):
    cfg = tiny_train_config(data, run_copy, steps=3, **BASE)
    proc = subprocess.Popen(train_command(cfg), cwd=REPO, env=pause_env(subprocess_env(DEVICES), "output-locked"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_stopped(proc)
    finally:
        kill(proc)
    assert locks.lock_path(run_copy).is_file()
    assert train(cfg)["step"] == 3  # the run is complete: restore, nothing to train
    assert (f"note: replaced the stale lock {locks.lock_path(run_copy)} (its process {proc.pid} on this machine is "
            "gone)") in capsys.readouterr().out
    assert not locks.lock_path(run_copy).exists()


# ------------------------------------------------------------------------------ what a checkpoint must hold
def test_the_nan_stop_never_names_a_checkpoint_whose_state_is_not_finite(run_copy, capsys):
    """Step 4 saved with NaN parameters (and the finite loss of the step before the update, as after an infinite
    update): the finite check computed at save time keeps it from being named, or resumed from."""
    abstract, state = abstract_of(run_copy / "checkpoints", 3)
    state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
    ckpts = Checkpoints(run_copy / "checkpoints", async_save=False)
    meta = ckpts.read_meta(3)
    ckpts.save(4, state, dict(meta, step=4, loss=meta["loss"]))
    assert integrity.verify_manifest(run_copy / "checkpoints" / "4")  # sealed: its files are as written
    assert ckpts.newest_good() == 3
    step, _, _ = Checkpoints(run_copy / "checkpoints").restore_latest(abstract)
    assert step == 3
    assert "checkpoints/4: its state was not finite (NaN or Inf) when it was saved" in capsys.readouterr().out


def test_every_config_field_is_part_of_the_run_identity_unless_listed_as_run_only(data, tmp_path):
    """Changing any field of the train recipe (and of the model config) changes the state part of the identity,
    the data part for DATA_FIELDS, and neither for RUN_ONLY_FIELDS / RUNTIME_MODEL_FIELDS: a new field is in the
    identity unless listed on purpose."""
    cfg = tiny_train_config(data, tmp_path, steps=3)
    config, model = cfg.to_dict(), model_config(cfg).to_dict()
    flat = dict(guard._flatten(config, ""))
    assert set(guard.RUN_ONLY_FIELDS) <= set(flat) and set(guard.DATA_FIELDS) <= set(flat)  # no stale names
    base = guard.identity(config, model, 16)

    def other(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value * 2 + 1
        if isinstance(value, str):
            return value + "x"
        if isinstance(value, (list, tuple)):
            return [*value, 7]
        return 0.5  # None

    def changed_part(conf, mod):
        state, data_ = guard.identity(conf, mod, 16)
        return ({"state"} if state != base[0] else set()) | ({"data"} if data_ != base[1] else set())

    for key, value in flat.items():
        if key.startswith("model.") and key != "model.init_from" and key != "model.preset":
            continue  # the model fields are compared from the model config, below
        conf = json.loads(json.dumps(config))
        node = conf
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = other(value)
        expected = set() if key in guard.RUN_ONLY_FIELDS else {"data"} if key in guard.DATA_FIELDS else {"state"}
        assert changed_part(conf, model) == expected, key
    for key, value in guard._flatten(model, "").items():
        mod = json.loads(json.dumps(model))
        node = mod
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = other(value)
        expected = set() if key.split(".")[0] in guard.RUNTIME_MODEL_FIELDS else {"state"}
        assert changed_part(config, mod) == expected, key
    for key in ("train.loss_reduction", "train.master_dtype", "train.micro_batches"):  # issue 23, item 7
        assert key in base[0]


def test_a_resume_with_another_master_dtype_is_refused_and_leaves_the_checkpoints(data, run_copy):
    before = tree_listing(run_copy / "checkpoints")
    with pytest.raises(guard.RunMismatch, match=r'train.master_dtype "float32" -> "bfloat16"'):
        train(tiny_train_config(data, run_copy, steps=4, **BASE, **{"train.master_dtype": "bfloat16"}))
    assert tree_listing(run_copy / "checkpoints") == before


def test_every_checkpoint_broken_is_refused_naming_what_was_moved_unless_a_restart_is_asked(data, run_copy):
    for step in (1, 2, 3):
        flip_bits(largest_file(run_copy / "checkpoints" / str(step) / "state"))
    with pytest.raises(CheckpointError) as err:
        train(tiny_train_config(data, run_copy, steps=3, **BASE))
    moved = sorted((run_copy / "checkpoints.broken").glob("[0-9]*-*[0-9]"))
    assert [p.name.split("-")[0] for p in moved] == ["1", "2", "3"]
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"every checkpoint in {run_copy / 'checkpoints'} is broken")
    assert all(str(p) in message for p in moved) and RESTART_FLAG in message
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit()]
    # asked to restart: the broken steps are moved aside and the run starts from step 0
    for p in moved:
        p.rename(run_copy / "checkpoints" / p.name.split("-")[0])
    assert Checkpoints(run_copy / "checkpoints").restore_latest({}, restart_if_all_broken=True) is None
    assert len(list((run_copy / "checkpoints.broken").glob("[0-9]*-*[0-9]"))) == 3
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit()]


# ------------------------------------------------------------------------------ sealing, and an unsealed checkpoint
SAVES = """
import sys
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from llavaction_jax.train.checkpoint import Checkpoints
state = ocp.CheckpointManager(sys.argv[1]).restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
ckpts = Checkpoints(sys.argv[2], async_save=True)
for step in (1, 2, 3):
    ckpts.save(step, state, {"step": step, "loss": 1.0})
    state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    ckpts.check()
ckpts.close()
"""


def test_checkpoints_are_sealed_when_saved_and_an_unsealed_one_is_read_back_against_its_digest(base_run, tmp_path,
                                                                                              capsys):
    """Real async saves of the train state in a child process, which stops itself once step 1 is sealed (its
    checksums exist before step 2 is saved), then once step 2's save is complete but not sealed, and is SIGKILLed
    there. The unsealed step is resumed from after every array matched its digest; with flipped bytes it is moved
    aside and step 1 is used."""
    out = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", SAVES, str(base_run / "checkpoints"), str(out)], cwd=REPO,
                            env=pause_env(subprocess_env(DEVICES), "checkpoint-sealed:1,checkpoint-saved:2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_stopped(proc)
        assert integrity.verify_manifest(out / "1") and not (out / "2").exists()
        resume(proc)
        wait_until_stopped(proc)
    finally:
        kill(proc)
    unsealed = out / "2"
    assert unsealed.is_dir() and not integrity.has_manifest(unsealed)
    abstract, _ = abstract_of(out, 1)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    step, _, _ = Checkpoints(copy).restore_latest(abstract)
    assert step == 2
    assert (f"checkpoint {copy / '2'} has no checksums.json (the run stopped after its save, before it was sealed): "
            "every array was read back and matches the digest saved with it") in capsys.readouterr().out
    flip_bits(largest_file(unsealed / "state"), n=3)
    step, _, _ = Checkpoints(out).restore_latest(abstract)
    assert step == 1 and f"skipping checkpoint {unsealed}: " in capsys.readouterr().out


# ------------------------------------------------------------------------------ a full disk
def test_a_full_disk_during_a_save_stops_the_run_with_that_saves_error_keeping_the_earlier_checkpoints(
        data, base_run, tmp_path):
    """The run directory on a real size-limited tmpfs with room for less than one more checkpoint: the async save
    of step 4 fails; the run stops with its own error (ENOSPC, the path, the free space) and keeps steps 1-3."""
    mount = tmp_path / "small"
    mount.mkdir()
    used = sum(p.stat().st_size for p in base_run.rglob("*") if p.is_file())
    checkpoint = sum(p.stat().st_size for p in (base_run / "checkpoints" / "3").rglob("*") if p.is_file())
    size = used + checkpoint // 2 + (1 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mounted.stderr.strip() or mounted.returncode}); the "
                    "full-disk test needs one (run as root, or with CAP_SYS_ADMIN)")
    try:
        run = mount / "run"
        shutil.copytree(base_run, run)
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * max(0, free - checkpoint // 2))
        with pytest.raises(CheckpointSaveError) as err:
            train(tiny_train_config(data, run, steps=5, **BASE, **{"train.async_checkpoint": True}))
        message = str(err.value)
        assert message.startswith(f"saving checkpoint 4 to {run / 'checkpoints' / '4'} failed: "), message
        assert "No space left on device" in message and " free on that filesystem" in message
        assert "the earlier checkpoints are kept (1, 2, 3); free space and rerun" in message
        for step in (1, 2, 3):
            assert integrity.verify_manifest(run / "checkpoints" / str(step))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]
        assert not locks.lock_path(run).exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
