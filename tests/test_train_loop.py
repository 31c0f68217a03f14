"""The training loop: exact resume, SIGTERM preemption, NaN stop, truncated checkpoints, 2-process training."""

import json
import pathlib
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

from _cli_e2e import run_cli
from _train_fixtures import (assert_same_tree, make_training_data, subprocess_env, tiny_train_args,
                             tiny_train_config, train_command)
from llavaction_jax.train import checkpoint
from llavaction_jax.train.loop import NonFiniteLoss, train
from test_metrics_writer import read_scalars

REPO = pathlib.Path(__file__).resolve().parents[1]
# Training on a sharded mesh (fsdp x tensor = 2 x 2 of 4 fake CPU devices: the state is saved from and restored into
# both kinds of sharding; 4 devices cost about a fifth less CPU than 8): the module runs in a child process with 4
# devices, each test with a deadline (tests/_watchdog.py); the first one's includes the uninterrupted 6-step run of
# the module fixture. The `train` child process gets the same devices.
DEVICES = 4
pytestmark = pytest.mark.watchdog(1200, devices=DEVICES)
MESH = {"mesh.fsdp": -1, "mesh.tensor": 2}  # fsdp: the rest of the devices (2 here; 4 where the watchdog is off)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    summary = train(tiny_train_config(data, out, steps=6, **MESH))
    return out, summary


def restore_state(out: pathlib.Path):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(out / "checkpoints")
    step = mngr.latest_step()
    return step, mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_uninterrupted_run_learns_and_writes_artifacts(data, uninterrupted):
    out, summary = uninterrupted
    assert summary["stopped"] == "completed" and summary["step"] == 6
    assert summary["losses"][-1] < summary["losses"][0]
    assert (out / "model" / "llavaction_config.json").is_file()
    scalars = read_scalars(out / "tensorboard")  # grouped tags, one value per logged step (log_every=1)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 7))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(summary["losses"])
    assert {"optim/grad_norm", "optim/lr_llm", "perf/tokens_per_s", "perf/mfu"} <= set(scalars)
    # the final model carries the tokenizer it was trained with (data.tokenizer), so eval / predict / to-torch use it
    model_dir = out / "model"
    assert (model_dir / "tokenizer.json").read_text() == (data / "tokenizer" / "tokenizer.json").read_text()
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert json.loads((model_dir / "config.json").read_text())["frames_upbound"] == 2  # the shards' frames
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    # the loop's own cost, measured in the run: wall per step between log lines against the step timed alone
    assert summary["step_time_s"] > 0 and summary["jitted_step_s"] > 0
    assert summary["loop_overhead"] == pytest.approx(summary["step_time_s"] / summary["jitted_step_s"] - 1)
    assert json.loads((out / "summary.json").read_text())["loop_overhead"] == summary["loop_overhead"]


def test_three_steps_restart_three_steps_equals_six(data, uninterrupted, tmp_path):
    out_a, summary_a = uninterrupted
    first = train(tiny_train_config(data, tmp_path, steps=6, **MESH, **{"train.stop_at_step": 3}))
    assert first["stopped"] == "paused" and first["step"] == 3
    second = train(tiny_train_config(data, tmp_path, steps=6, **MESH))
    assert second["step"] == 6
    # same data order and same updates: the losses of steps 4-6 match, and so does the final state
    np.testing.assert_array_equal(first["losses"] + second["losses"], summary_a["losses"])
    step_a, state_a = restore_state(out_a)
    step_b, state_b = restore_state(tmp_path)
    assert step_a == step_b == 6
    assert_same_tree(state_a, state_b)


@pytest.mark.cli_e2e("train")
def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_same(data, uninterrupted, tmp_path):
    out_a, _ = uninterrupted
    cfg = tiny_train_config(data, tmp_path, steps=6, **MESH)
    proc = subprocess.Popen(train_command(cfg), cwd=REPO, env=subprocess_env(DEVICES), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training is under way, then preempt
        lines.append(line)
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, "".join(lines)  # no timeout of its own: the watchdog bounds the test
    assert any("SIGTERM" in line for line in lines), "".join(lines)
    step, _ = restore_state(tmp_path)
    assert 2 <= step < 6
    assert run_cli(["train", *tiny_train_args(data, tmp_path, steps=6, **MESH)]) == 0  # the resume, through the CLI
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 6
    assert_same_tree(restore_state(out_a)[1], restore_state(tmp_path)[1])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = tiny_train_config(data, tmp_path, steps=20, **MESH, **{"optim.learning_rate": 1e30,
                                                                  "optim.vision_lr": 1e30, "train.checkpoint_every": 1})
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step \d+; stopping. The last good checkpoint"):
        train(cfg)
    step, state = restore_state(tmp_path)
    assert step is not None
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_a_non_finite_loss_between_log_lines_is_caught_before_the_next_checkpoint(data, tmp_path):
    """Metrics are fetched at log lines and checkpoints only: a loss that turns non-finite between them is found at
    the checkpoint step, named by its own step, and nothing is saved."""
    cfg = tiny_train_config(data, tmp_path, steps=20, **MESH, **{"optim.learning_rate": 1e30, "optim.vision_lr": 1e30,
                                                                  "train.log_every": 100, "train.checkpoint_every": 4})
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step [234]; stopping. .* is none in "):
        train(cfg)
    assert checkpoint.Checkpoints(tmp_path / "checkpoints").newest_good() is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]  # no step was saved


def test_checkpoint_truncated_mid_save_is_skipped_with_a_warning(data, uninterrupted, tmp_path, capsys):
    out_a, _ = uninterrupted
    shutil.copytree(out_a / "checkpoints", tmp_path / "checkpoints")
    broken = tmp_path / "checkpoints" / "6" / "state"
    for f in broken.rglob("*"):  # cut every data file in half, as a kill during the write would
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints")
    _, abstract = restore_state(out_a)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    step, state, meta = ckpts.restore_latest(abstract)
    assert step == 3 and meta["step"] == 3
    assert f"skipping checkpoint {tmp_path / 'checkpoints' / '6'}" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints" / "6").exists() and len(list((tmp_path / "checkpoints.broken").glob("6-*/state"))) == 1

