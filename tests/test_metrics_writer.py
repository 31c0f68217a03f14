"""Training scalars through tensorboardX under grouped tags, read back from the event files with a TFRecord reader
written here (tensorboardX's protobuf classes parse each record); tok/s and MFU as scalars; W&B only when asked."""

import struct
import sys
import types

import pytest

from llavaction_jax.config import ConfigError
from llavaction_jax.train import metrics


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: uint64 length, uint32 crc, payload, uint32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


STEP = {"loss": 2.5, "lm_loss": 2.0, "aux_loss": 5.0, "tokens": 640.0, "grad_norm": 1.25, "lr_llm": 1e-5,
        "lr_vision": 2e-6}


def test_scalars_are_grouped_and_readable_by_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.scalars(10, STEP)
    writer.scalars(20, {**STEP, "loss": 1.5, "tokens_per_s": 3200.0, "step_time_s": 0.2, "mfu": 0.41})
    writer.close()
    got = read_scalars(tmp_path)
    assert set(got) == {"train/loss", "train/lm_loss", "train/aux_loss", "train/tokens", "optim/grad_norm",
                        "optim/lr_llm", "optim/lr_vision", "perf/tokens_per_s", "perf/step_time_s", "perf/mfu"}
    assert got["train/loss"] == [(10, 2.5), (20, 1.5)]
    assert got["perf/mfu"] == [(20, pytest.approx(0.41))] and got["optim/lr_vision"] == [(10, pytest.approx(2e-6)),
                                                                                           (20, pytest.approx(2e-6))]


def test_rates_are_consistent_scalars_and_the_first_logged_step_has_none():
    progress = metrics.Progress(total_steps=100, flops_per_step=4e12, peak_flops=1e14)
    assert progress.rates(1, STEP) == {}  # the first step includes compiling
    rates = progress.rates(3, STEP)
    assert set(rates) == {"tokens_per_s", "step_time_s", "mfu"}
    assert rates["tokens_per_s"] == pytest.approx(STEP["tokens"] / rates["step_time_s"])
    assert rates["mfu"] == pytest.approx(4e12 / rates["step_time_s"] / 1e14)
    line = progress.line(3, STEP, rates)
    assert "tok/s" in line and "MFU" in line and "ETA" in line
    assert progress.rates(3, STEP) == {}  # no step since the last call


def test_step_outputs_stay_on_the_device_until_fetched_together():
    import jax
    import jax.numpy as jnp

    step = jax.jit(lambda x: {"loss": x.sum(), "grad_norm": x.max()})
    outputs = metrics.StepOutputs()
    for i in range(1, 4):
        outputs.add(i, step(jnp.full((3,), float(i))))
    fetched = outputs.fetch()
    assert fetched == [(1, {"loss": 3.0, "grad_norm": 1.0}), (2, {"loss": 6.0, "grad_norm": 2.0}),
                       (3, {"loss": 9.0, "grad_norm": 3.0})]
    assert all(type(v) is float for _, m in fetched for v in m.values())
    assert outputs.fetch() == []  # each step once


def test_loop_clock_times_one_step_after_a_log_line_and_not_beside_a_checkpoint():
    import time

    clock = metrics.LoopClock(probe_every=3)
    assert clock.probe_starts(1) is None  # nothing synced yet: the first step compiles
    clock.synced(1, logged=True, saved=False)
    started = clock.probe_starts(2)
    assert started is not None and clock.probe_starts(2) is None  # once per sync
    time.sleep(0.02)
    clock.probe_ends(started, {"loss": 0.0})
    assert clock.alone[0][0] >= 0.02 and 0 <= clock.alone[0][1] < 0.02  # wall, CPU (a sleep costs no CPU)
    clock.synced(3, logged=True, saved=False)
    assert clock.probe_starts(4) is None  # fewer than probe_every steps since the last timed one
    clock.synced(5, logged=True, saved=True)
    assert clock.probe_starts(6) is None  # a checkpoint is being written beside it
    clock.synced(8, logged=True, saved=False)
    assert clock.probe_starts(9) is not None
    assert len(clock.walls) == 3  # the intervals 1-3, 3-5, 5-8 (not the first, which compiles)
    s = clock.summary()
    assert s["loop_overhead"] == pytest.approx((s["step_time_s"] - s["jitted_step_s"]) / s["jitted_step_s"])
    assert {"step_cpu_s", "jitted_step_cpu_s", "loop_cpu_overhead"} <= set(s)
    assert clock.line(s).startswith("loop: ") and "loop overhead" in clock.line(s)


def test_wandb_is_refused_when_asked_for_but_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # make sure: absent even where a user installed it
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    metrics.check_wandb("")  # not asked: fine
    with pytest.raises(ConfigError, match="wandb is not installed"):
        metrics.check_wandb("my-project")


def test_wandb_gets_the_same_grouped_scalars_when_installed(tmp_path, monkeypatch):
    # wandb is not installed here (it needs an account and the network): a stand-in module records the calls.
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: object())
    writer = metrics.MetricsWriter(tmp_path, wandb_project="proj", wandb_run="r1", config={"train": {"steps": 3}})
    writer.scalars(5, {"loss": 1.0, "mfu": 0.5})
    writer.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["name"] == "r1"
    assert calls[1] == ("log", 5, {"train/loss": 1.0, "perf/mfu": 0.5}) and calls[2] == ("finish",)
    assert read_scalars(tmp_path)["train/loss"] == [(5, 1.0)]
