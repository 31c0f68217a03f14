"""Ahead-of-time compilation for TPU slices on this CPU machine (bench/aot.py, docs/aot.md): the tiny model's train
and eval programs lower to splash attention inside shard_map for a v5e:2x2 slice, and the command line compiles
both jobs, reads the kernels back from the compiled programs and sizes their memory as the sharding rules promise.
Also: a host without accelerators defaults JAX to the CPU, so the installed libtpu stays silent."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from llavaction_jax.bench import aot_targets

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64",
    reason="libtpu publishes wheels for x86-64 Linux only: no TPU compiler to describe a slice with here")

TOPOLOGY, CHIPS = "v5e:2x2", 4


@pytest.fixture(scope="module")
def tpu_devices():
    aot_targets.prepare_environment()  # the same setup the command uses (no lock file, no logs)
    return aot_targets.target_devices(TOPOLOGY)[1]


def lowered_text(program, mesh):
    with jax.set_mesh(mesh):
        return program.jitted.lower(*program.args, **program.static).as_text()


def test_tiny_programs_lower_to_splash_inside_shard_map(tpu_devices):
    """Lowering only (seconds): every splash call is a Mosaic kernel on per-device blocks inside shard_map."""
    from llavaction_jax.bench import aot_programs
    from llavaction_jax.config import preset_configs
    from llavaction_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=tpu_devices)
    cfg, execution = preset_configs("tiny")
    execution = execution.replace(compute_dtype="bfloat16", attention="auto")
    train_ex = execution.replace(remat_policy="full").resolve("tpu", CHIPS)
    train = aot_programs.train_program(cfg.replace(param_dtype="float32"), train_ex, mesh, frames=2, seq=64,
                                       micro_batches=1)
    generate, score = aot_programs.eval_programs(cfg.replace(param_dtype="bfloat16"), execution.resolve("tpu", CHIPS),
                                                 mesh, frames=2, batch=2, max_new_tokens=4)
    out_len = generate.static["out_len"]  # prompt + visual tokens of an eval row
    for program, kernels, lm_tokens in ((train, {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}, 64),
                                        (generate, {"splash_mha_fwd"}, out_len), (score, {"splash_mha_fwd"}, out_len)):
        text = lowered_text(program, mesh)
        assert set(re.findall(r'kernel_name = "(splash_mha_[a-z]+)', text)) == kernels, program.name
        # Operands of the shard_map bodies (not a GSPMD-partitioned call): each device's rows and heads, tokens
        # padded to 128 and head dims to 128 lanes. LM: 1 of 2 rows, 2 of 4 query heads, 1 of 2 KV heads;
        # SigLIP: 2 of 4 frames, 2 of 4 heads, 16 patches.
        manual = "\n".join(line for line in text.splitlines() if "sdy.manual_computation" in line)
        for rows, heads, tokens in ((1, 2, lm_tokens), (1, 1, lm_tokens), (2, 2, 16)):
            assert f"tensor<{rows}x{heads}x{-(-tokens // 128) * 128}x128xbf16>" in manual, (program.name, rows, heads)


@pytest.fixture(scope="module")
def cli_rows(tmp_path_factory, tpu_devices):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    run = subprocess.run([sys.executable, "-m", "llavaction_jax.bench.aot", "--job", "all", "--model", "tiny",
                          "--topology", TOPOLOGY, "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TPU_ACCELERATOR_TYPE" not in run.stderr and "TPU_WORKER_HOSTNAMES" not in run.stderr  # quiet libtpu
    return json.loads(out.read_text()), run.stdout


def test_cli_compiles_both_jobs_with_splash_and_they_fit(cli_rows):
    rows, stdout = cli_rows
    assert [r["job"] for r in rows] == ["train", "eval"] and stdout.count(" -> fits;") == 2
    for row in rows:
        assert {"job", "model", "topology", "attention", "bytes_per_chip", "chip_hbm_bytes", "fits",
                "flops"} <= set(row)
        assert row["model"] == "tiny" and row["topology"] == TOPOLOGY and row["chips"] == CHIPS
        assert row["chip_hbm_bytes"] == 16 * 2**30 and row["fits"] is True
        b = row["bytes_per_chip"]
        assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] <= row["chip_hbm_bytes"]
        assert row["flops"] > 0 and row["roofline_s_estimate"] == pytest.approx(row["flops"] / (CHIPS * 197e12))
    train, evaluation = rows
    assert train["attention"] == {"language": "splash", "vision": "splash (head dim 16 zero-padded to 128)"}
    # decode steps and option tokens attend over the KV cache (T != S): not splash's self-attention
    assert evaluation["attention"]["language"] == "splash; over the KV cache: xla"
    assert evaluation["attention"]["vision"] == train["attention"]["vision"]
    assert train["mesh"] == {"data": 1, "fsdp": CHIPS, "tensor": 1} and evaluation["mesh"]["data"] == CHIPS
    assert train["settings"]["global_batch"] == 256 and train["settings"]["micro_batches"] == 256 // CHIPS


def tpu_tiled_bytes(shape, itemsize) -> int:
    """Bytes of an array in TPU memory: its two minor dims padded to (8, 128) tiles (16 / 32 rows for 2- / 1-byte
    types, which pack along the rows)."""
    shape = [1] * max(0, 2 - len(shape)) + list(shape)
    rows = {4: 8, 2: 16, 1: 32}[itemsize]
    return int(np.prod(shape[:-2])) * -(-shape[-2] // rows) * rows * -(-shape[-1] // 128) * 128 * itemsize


def test_cli_memory_is_the_sharded_state_and_batch(cli_rows):
    """A chip's arguments are its shard of the batch and of the state: fp32 params + AdamW moments split over
    fsdp for training, bf16 params replicated over the data-parallel eval mesh. Bound: at most twice the raw
    bytes (the tiny model's narrow matrices fill (8, 128) tiles half); a replicated training state would be 4x."""
    from llavaction_jax.bench import aot_programs as ap

    train, evaluation = cli_rows[0]
    s, e = train["settings"], evaluation["settings"]
    assert 12 * s["n_params"] <= s["state_bytes"] <= 12 * s["n_params"] + 1024  # fp32 params, mu, nu; step counts
    size = 64  # the tiny preset's frames
    train_batch = [((s["global_batch"], s["text_len"]), 4), ((s["global_batch"], s["text_len"]), 1),
                   ((s["global_batch"], s["text_len"]), 4), ((s["global_batch"], s["frames"], 3, size, size), 4),
                   ((s["global_batch"], 3), 4), ((s["global_batch"],), 1)]
    eval_batch = [((e["batch"], ap.EVAL_PROMPT_TOKENS), 4), ((e["batch"], ap.EVAL_PROMPT_TOKENS), 1),
                  ((e["batch"], e["frames"], 3, size, size), 4), ((e["batch"],), 4),
                  ((e["batch"], ap.EVAL_OPTIONS, ap.EVAL_OPTION_TOKENS), 4),
                  ((e["batch"], ap.EVAL_OPTIONS, ap.EVAL_OPTION_TOKENS), 1)]
    for row, arrays, raw in ((train, train_batch, s["state_bytes"] / CHIPS),
                             (evaluation, eval_batch, 2 * s["n_params"])):
        batch = sum(tpu_tiled_bytes((shape[0] // CHIPS, *shape[1:]), itemsize) for shape, itemsize in arrays)
        state = row["bytes_per_chip"]["arguments"] - batch
        assert raw <= state <= 2 * raw, (row["job"], state, raw)
    assert train["bytes_per_chip"]["aliased"] >= s["state_bytes"] / CHIPS  # the donated state is updated in place


def test_accelerator_free_host_reads_pci_vendors_and_gpu_nodes(tmp_path):
    from llavaction_jax.host import accelerator_free_host

    nic = tmp_path / "sys/bus/pci/devices/0000:00:04.0"
    nic.mkdir(parents=True)
    (nic / "vendor").write_text("0x1af4\n")  # virtio
    assert accelerator_free_host(str(tmp_path))
    tpu = tmp_path / "sys/bus/pci/devices/0000:00:05.0"
    tpu.mkdir()
    (tpu / "vendor").write_text("0x1ae0\n")
    assert not accelerator_free_host(str(tmp_path))
    (tpu / "vendor").write_text("0x1af4\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvidiactl").touch()
    assert not accelerator_free_host(str(tmp_path))


def test_cli_on_a_host_without_accelerators_keeps_libtpu_silent():
    """With JAX_PLATFORMS unset the entry point picks the CPU here, so JAX never starts the installed libtpu."""
    code = ("import os, sys\nfrom llavaction_jax import cli\ntry:\n    cli.main(['no-such-command'])\n"
            "except SystemExit:\n    pass\nimport jax\nprint(jax.devices()[0].platform, os.environ['JAX_PLATFORMS'])")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.split() == ["cpu", "cpu"], run.stderr
    assert "TPU" not in run.stderr and "libtpu" not in run.stderr
    np.testing.assert_equal(run.returncode, 0)


def test_kernels_are_read_from_op_names_and_hardware_calls():
    """bench.aot_hlo on instructions shaped like XLA's: scopes under transformations, fused names joined by ';',
    a custom call whose metadata follows a multi-line attribute, and a splash scope without its Mosaic call."""
    from llavaction_jax.bench.aot_hlo import attention_kernels, gpu_kernels

    hlo = "\n".join([
        '  %fusion.1 = bf16[2,4] fusion(%p), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(siglip))/'
        'xla_attention/dot_general"}',
        '  %splash_mha_fwd.3 = (f32[8,128]) custom-call(%a), custom_call_target="tpu_custom_call", '
        'frontend_attributes={kernel_metadata={\n"xprof_metadata":"{}"\n}}, metadata={op_name="jit(step)/while/body/'
        'qwen2/splash_attention/shard_map/vmap(static_sparsity_splash)/pallas_call"}',
        '  ROOT %add.2 = f32[8] add(%x, %y), metadata={op_name="jit(score_step)/reshape;qwen2/'
        'xla_cache_attention/add"}',
        '  %cp.4 = f32[8] copy(%z), metadata={op_name="jit(generate_step)/qwen2/splash_attention/copy"}',
        '  %gemm.5 = bf16[8,8] custom-call(%u, %w), custom_call_target="__cudnn$fmhaSoftmax", '
        'backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}, metadata={op_name="jit(f)/dot"}',
    ])
    assert attention_kernels(hlo) == {"language": {"attention": ["splash"], "cache_attention": ["xla"]},
                                      "vision": {"attention": ["xla"]}}
    assert attention_kernels(hlo.split("\n  %splash_mha_fwd.3")[0] + hlo.split('pallas_call"}')[1]) == {
        "language": {"attention": ["splash (no kernel call)"], "cache_attention": ["xla"]},
        "vision": {"attention": ["xla"]}}
    assert gpu_kernels(hlo) == {"__cudnn$fmhaSoftmax": 1, "__triton_gemm": 1, "tpu_custom_call": 1}
    # lowered (unoptimized) HLO names a nested computation's calls relative to it: a call anywhere counts there
    relative = hlo.replace("qwen2/splash_attention/shard_map/", "")
    assert attention_kernels(relative)["language"]["attention"] == ["splash (no kernel call)"]
    assert attention_kernels(relative, calls_in_scope=False)["language"]["attention"] == ["splash"]


def test_tpu_compiler_refusal_says_by_how_much():
    from llavaction_jax.bench.aot_hlo import tpu_out_of_memory

    total = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
             "20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.\n\nTotal hbm usage >= 20.50G:")
    assert tpu_out_of_memory(total) == {"used": int(20.5 * 2**30), "counts": "total", "limit": int(15.75 * 2**30),
                                        "message": total.splitlines()[0]}
    temps = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (22.86G) "
             "exceeds available HBM (15.75G).")  # seen compiling the 0.5B train step for v5e:2x2
    assert tpu_out_of_memory(temps) == {"used": int(22.86 * 2**30), "counts": "temporaries",
                                        "limit": int(15.75 * 2**30), "message": temps}
    assert tpu_out_of_memory("INVALID_ARGUMENT: something else") is None


def test_gpu_topology_without_the_cuda_plugin_is_a_one_line_error():
    chip, _ = aot_targets.parse_topology("h100:8")
    if aot_targets.target_problem(chip) is None:
        pytest.skip("the CUDA plugin is installed in this environment: GPU topologies compile here")
    run = subprocess.run([sys.executable, "-m", "llavaction_jax.bench.aot", "--topology", "h100:8", "--model", "tiny"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "CUDA plugin" in run.stderr and 'pip install ".[cuda12]"' in run.stderr


def test_a_model_config_file_loads_as_its_preset_does(tmp_path):
    """`--model configs/tiny.py` (a file) gives the preset `tiny`'s configs; a file without get_config is named."""
    from llavaction_jax.bench.aot import load_model
    from llavaction_jax.config import CONFIGS_DIR, ConfigError, preset_configs

    assert load_model(str(CONFIGS_DIR / "tiny.py")) == (preset_configs("tiny"), "tiny")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="empty.py: no get_config"):
        load_model(str(tmp_path / "empty.py"))


def test_a_benchmark_on_a_host_without_accelerators_starts_on_the_cpu_without_trying_the_tpu_runtime():
    """libtpu is installed for the compiles above; `python -m llavaction_jax.bench.<name>` must not try it first."""
    from llavaction_jax.host import accelerator_free_host

    if not accelerator_free_host():
        pytest.skip("this host has an accelerator: JAX is right to try it")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    run = subprocess.run([sys.executable, "-c", "import llavaction_jax.bench, jax; print(jax.default_backend())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["cpu"], run.stdout + run.stderr
    assert "TPU_ACCELERATOR_TYPE" not in run.stderr and "TPU_WORKER_HOSTNAMES" not in run.stderr, run.stderr
