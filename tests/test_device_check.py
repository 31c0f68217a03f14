"""bench/device_check.py: the --smoke run (every section, sane values, no data-pipeline or ml_collections import,
as on the GPU machine), the model sizes against configs/*.py, and the guards (a failing or late section is
recorded and the run goes on)."""

import json
import math
import subprocess
import sys

import pytest

from llavaction_jax.bench import device_check as dc
from llavaction_jax.config import preset_configs
from llavaction_jax.sharding import resolve_execution

# Not installed on the GPU machine (or not needed there): the check must run without them.
BLOCKED = ("ml_collections", "grain", "array_record", "decord", "av", "transformers", "torch")
RUN = f"""
import sys, runpy
for name in {BLOCKED!r}:
    sys.modules[name] = None  # import fails, as where the package is missing
sys.argv = ["device_check"] + sys.argv[1:]
runpy.run_module("llavaction_jax.bench.device_check", run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc = subprocess.run([sys.executable, "-c", RUN, "--smoke", "--out", str(out / "r.json"), "--markdown",
                           str(out / "r.md")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text(), proc.stdout


def test_smoke_json_has_every_section_with_sane_values(smoke):
    results, _, _ = smoke
    sec = results["sections"]
    assert list(sec) == list(dc.SECTIONS) and results["smoke"]
    assert all(s["section_s"] >= 0 for s in sec.values())
    assert sec["devices"]["status"] == "ok" and sec["devices"]["device_count"] >= 1
    assert sec["devices"]["bf16_matmul_tflops"] > 0 and sec["devices"]["jax"]

    attn = {(c["tokens"], c["impl"]): c for c in sec["attention"]["cases"]}
    for length in dc.SMOKE.attn_lengths:
        assert attn[(length, "cudnn")]["status"] == "unsupported"  # CPU: recorded, not fatal
        for impl in ("flash", "xla"):
            case = attn[(length, impl)]
            assert case["status"] == "ok", case
            assert case["fwd_ms"] > 0 and case["fwd_bwd_ms"] > 0
            assert 0 < case["max_diff"] < 0.05, case  # bf16 against the fp32 reference
        assert sec["attention"]["auto"][str(length)] in ("xla", "flash")

    fwd = sec["forward_7b"]
    assert fwd["status"] == "ok" and fwd["prefill_s"] > 0 and 0 < fwd["mfu"] < 5 and fwd["tokens"] > dc.SMOKE.prompt
    cases = sec["eval_7b"]["cases"]
    assert {(c["batch"], c["mode"]) for c in cases} == {(b, m) for b in dc.SMOKE.eval_batches for m in ("score", "generate")}
    for c in cases:
        assert c["status"] == "ok" and c["questions_per_s"] > 0, c
        assert math.isclose(c["projected_s"], dc.EK100_QUESTIONS / c["questions_per_s"])

    train = sec["train_0_5b"]
    assert train["status"] == "ok" and train["tokens_per_s"] > 0 and train["steps_timed"] >= 1, train
    assert math.isfinite(train["loss"]) and train["mfu"] > 0 and train["remat"] == "full"
    big = sec["train_7b"]  # smoke gives it a 1 MiB device: the path an H100 takes for the 7B
    assert big["status"] == "does_not_fit" and big["state_and_grads_bytes"] == 16 * big["params"] > 2**20


def test_smoke_prints_a_table_and_writes_markdown(smoke):
    results, markdown, stdout = smoke
    assert markdown.startswith("### device check: ") and "- command: `python -m llavaction_jax.bench.device_check" in markdown
    for name in dc.SECTIONS:
        assert f"\n{name} " in stdout and f"- {name} / " in markdown
    assert "not a measurement" in markdown


@pytest.mark.parametrize("name", ["llavaction_7b", "llavaction_0_5b", "tiny"])
def test_sizes_equal_the_config_files(name):
    preset, execution = preset_configs(name)
    got = dc.model_config(name, param_dtype=preset.param_dtype, compute_dtype=execution.compute_dtype)
    assert got == (preset, resolve_execution(execution))  # the entry point's resolution of the same architecture


def test_failing_and_late_sections_are_recorded_and_the_run_goes_on(tmp_path):
    written = []
    broken = dc.Sizes(**{**dc.SMOKE.__dict__, "big": "no_such_model", "small": "no_such_model"})
    results = dc.run_checks(broken, 60, "full", lambda r: written.append(json.dumps(r, default=str)),
                            sections=("forward_7b", "eval_7b", "train_7b"))
    sec = results["sections"]
    assert list(sec) == ["devices", "forward_7b", "eval_7b", "train_7b"]  # devices always runs
    assert sec["devices"]["status"] == "ok"
    for name in ("forward_7b", "eval_7b", "train_7b"):
        assert sec[name]["status"] == "error" and "no_such_model" in sec[name]["error"]
    assert len(written) == len(sec) + 1  # after every section, and once at the end

    late = dc.run_checks(dc.SMOKE, 0, "full", lambda r: None)
    assert {s["status"] for s in late["sections"].values()} == {"skipped"}
    assert "-" in dc.format_table(late) and "skipped" in dc.markdown_block(late, "cmd")
