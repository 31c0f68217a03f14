"""Training runs that must not lose work: changed configs refused, corrupt checkpoints moved aside, the final model
always the final step's and swapped in whole, bad recipe values refused. Real Orbax checkpoints of the tiny model;
interruption tests kill a real `train` process."""

import json
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from _processes import kill_paused, pause_env, run_logged
from _train_fixtures import (assert_same_tree, corrupt_record, make_training_data, subprocess_env, tiny_train_config,
                             train_command)
from llavaction_jax import checkpoint_io, integrity
from llavaction_jax.config import ConfigError
from llavaction_jax.train import guard
from llavaction_jax.train.checkpoint import CheckpointError, Checkpoints
from llavaction_jax.train.loop import FINAL_STEP_FILE, train

# Training on 8 fake devices: the module runs in a child process, each test with a deadline (tests/_watchdog.py).
pytestmark = pytest.mark.watchdog(1200)

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"train.checkpoint_every": 1}


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
    return subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)


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
    summary = train(tiny_train_config(data, run_copy, steps=4, **BASE))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {run_copy / 'checkpoints' / '3'}: {corrupt} is corrupt" in out
    assert "resumed from step 2" in out
    assert summary["stopped"] == "completed" and summary["step"] == 4 and len(summary["losses"]) == 2
    # the broken step was renamed, not deleted, and step 3 was written again (no StepAlreadyExistsError)
    (moved,) = (run_copy / "checkpoints.broken").glob("3-*/state")
    assert (moved.parent / "state" / corrupt.relative_to(run_copy / "checkpoints" / "3" / "state")).is_file()
    for step in (2, 3, 4):
        assert integrity.verify_manifest(run_copy / "checkpoints" / str(step))
    # the final model is step 4's, swapped in whole
    assert json.loads((run_copy / "model" / FINAL_STEP_FILE).read_text()) == {"step": 4}
    params = checkpoint_params(run_copy, 4)
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
    marker, log = tmp_path / "paused", tmp_path / "train.log"
    # held inside the save (params written, config and checksums not), then killed there
    proc = run_logged(train_command(cfg), log, cwd=REPO, env=pause_env(subprocess_env(), "model-save", marker))
    kill_paused(proc, marker, log)
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
    ({"optim.warmup_ratio": 1.5}, "optim.warmup_ratio=1.5: must be in [0, 1]"),
    ({"data.on_bad_sample": "ignore"}, "data.on_bad_sample='ignore': must be 'error' or 'skip'"),
])
def test_recipe_values_are_validated(data, tmp_path, override, message):
    steps = override.pop("train.steps", 3)
    with pytest.raises(ConfigError) as err:
        guard.validate(tiny_train_config(data, tmp_path, steps=steps, **override))
    assert str(err.value).startswith(message)


def test_cli_refusals_are_one_line_with_exit_code_2(data, tmp_path):
    proc = run_cli(tiny_train_config(data, tmp_path, steps=3), **{"train.keep_checkpoints": 0})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "train.keep_checkpoints=0" in proc.stderr and not (tmp_path / "checkpoints").exists()
    proc = run_cli(tiny_train_config(data, tmp_path, steps=3), **{"data.samples": tmp_path / "missing.jsonl"})
    assert proc.returncode == 2 and proc.stderr.strip() == f"train: error: sample file {tmp_path / 'missing.jsonl'} does not exist"
